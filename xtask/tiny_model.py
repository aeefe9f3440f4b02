"""Writes a tiny random-weight llama model as GGUF, for tests of real engines (llama.cpp).

Usage: python3 tiny_model.py OUT.gguf [--seed N]

Architecture llama, 2 blocks, width 64, 4 heads, feed-forward 128, a 259-token vocabulary
(<unk>, <s>, </s> and the 256 byte tokens), every tensor f32: about 0.5 MB. The weights are random,
so the text is gibberish; what matters is that a real engine loads it and generates tokens.
"""

import argparse
import os

import gguf
import numpy as np

EMBED, BLOCKS, HEADS, FF = 64, 2, 4, 128


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    token_types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    token_types += [gguf.TokenType.BYTE] * 256

    writer = gguf.GGUFWriter(args.out, "llama")
    writer.add_name("xmod-shim tiny random llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(EMBED)
    writer.add_block_count(BLOCKS)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(EMBED // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(token_types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    ones = lambda n: np.ones(n, dtype=np.float32)  # noqa: E731
    # numpy shapes are (rows, cols); gguf stores them reversed, as ggml expects.
    writer.add_tensor("token_embd.weight", weight(len(tokens), EMBED))
    for b in range(BLOCKS):
        writer.add_tensor(f"blk.{b}.attn_norm.weight", ones(EMBED))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{b}.{name}.weight", weight(EMBED, EMBED))
        writer.add_tensor(f"blk.{b}.ffn_norm.weight", ones(EMBED))
        writer.add_tensor(f"blk.{b}.ffn_gate.weight", weight(FF, EMBED))
        writer.add_tensor(f"blk.{b}.ffn_up.weight", weight(FF, EMBED))
        writer.add_tensor(f"blk.{b}.ffn_down.weight", weight(EMBED, FF))
    writer.add_tensor("output_norm.weight", ones(EMBED))
    writer.add_tensor("output.weight", weight(len(tokens), EMBED))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
