"""Writes a llama-shaped GGUF of a given shape with PyPI `gguf`, for shim-model's tests.

Usage: python3 make_gguf.py OUT.gguf --layers N --embd N --heads N --kv-heads N --ff N
       --vocab N --ctx N [--type f32|f16|q8_0] [--random]

Weights are zeros unless --random (llama.cpp loads either; only the shapes matter for memory).
Token list: <unk>, <s>, </s>, the 256 byte tokens, then filler tokens up to --vocab.
"""

import argparse

import gguf
import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    for name in ("layers", "embd", "heads", "kv-heads", "ff", "vocab", "ctx"):
        p.add_argument(f"--{name}", type=int, required=True)
    p.add_argument("--type", default="f32", choices=["f32", "f16", "q8_0"])
    p.add_argument("--random", action="store_true")
    a = p.parse_args()
    rng = np.random.default_rng(7)
    head_dim = a.embd // a.heads
    kv_dim = head_dim * a.kv_heads

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"tok{i}" for i in range(a.vocab - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (a.vocab - len(types))

    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[a.type]
    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name("shim-model test llama")
    w.add_context_length(a.ctx)
    w.add_embedding_length(a.embd)
    w.add_block_count(a.layers)
    w.add_feed_forward_length(a.ff)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(ftype)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def matrix(rows: int, cols: int):
        data = (
            (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
            if a.random
            else np.zeros((rows, cols), dtype=np.float32)
        )
        if a.type == "f16":
            return data.astype(np.float16), None
        if a.type == "q8_0":
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            return q, gguf.GGMLQuantizationType.Q8_0
        return data, None

    def add(name: str, rows: int, cols: int) -> None:
        data, qtype = matrix(rows, cols)
        if qtype is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=qtype)

    ones = lambda n: np.ones(n, dtype=np.float32)  # noqa: E731
    add("token_embd.weight", a.vocab, a.embd)
    for b in range(a.layers):
        w.add_tensor(f"blk.{b}.attn_norm.weight", ones(a.embd))
        add(f"blk.{b}.attn_q.weight", a.embd, a.embd)
        add(f"blk.{b}.attn_k.weight", kv_dim, a.embd)
        add(f"blk.{b}.attn_v.weight", kv_dim, a.embd)
        add(f"blk.{b}.attn_output.weight", a.embd, a.embd)
        w.add_tensor(f"blk.{b}.ffn_norm.weight", ones(a.embd))
        add(f"blk.{b}.ffn_gate.weight", a.ff, a.embd)
        add(f"blk.{b}.ffn_up.weight", a.ff, a.embd)
        add(f"blk.{b}.ffn_down.weight", a.embd, a.ff)
    w.add_tensor("output_norm.weight", ones(a.embd))
    add("output.weight", a.vocab, a.embd)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
