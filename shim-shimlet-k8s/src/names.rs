//! Object names, labels and annotations: how the shimlet recognises what it manages.

use std::collections::BTreeMap;

/// Label every managed object (and pod) carries: `app.kubernetes.io/managed-by=xmod-shim`.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`LABEL_MANAGED_BY`].
pub const MANAGED_BY_VALUE: &str = "xmod-shim";
/// Label holding the service id; with [`LABEL_MANAGED_BY`] it is the Deployment's selector.
pub const LABEL_SERVICE_ID: &str = "xmod-shim/service-id";
/// Annotation holding the model name.
pub const ANNOTATION_MODEL: &str = "xmod-shim/model-name";
/// Annotation holding the spec generation the object was applied from.
pub const ANNOTATION_GENERATION: &str = "xmod-shim/generation";
/// Field manager of every server-side apply: one stable name, so re-applies own the same fields.
pub const FIELD_MANAGER: &str = "xmod-shim";
/// Name of the engine's container in each pod.
pub const CONTAINER_NAME: &str = "engine";
/// Name of the engine's port (container and Service).
pub const PORT_NAME: &str = "http";
/// Label selector of everything the shimlet manages.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=xmod-shim";

/// Longest Kubernetes name that is a DNS label (Services must be).
const MAX_NAME: usize = 63;
/// Longest object name this shimlet makes. Pods are named `<deployment>-<hash>-<xxxxx>`, but
/// Kubernetes cuts the `<deployment>-<hash>-` part to 58 characters, so a Deployment name of at
/// most 57 still begins each of its pods' names (which is how pods are told apart after a
/// rename).
pub const MAX_OBJECT_NAME: usize = 57;
/// Room kept for the service id part of a name.
const MAX_ID_PART: usize = 24;

/// The name of the Deployment and the Service of a workload: `xmod-<model>-<id>`, lower-case
/// DNS-1123 (a DNS-1035 label, so it is valid for Services too), at most 57 characters
/// ([`MAX_OBJECT_NAME`]), and a pure function of the service id and model name.
///
/// The id part keeps names unique: it is the service id itself when that is already a short DNS
/// label, else a sanitised prefix plus a hash of the raw id. The model part is what room is left.
pub fn object_name(service_id: &str, model_name: &str) -> String {
    let id_clean = sanitize(service_id);
    let id_part = if id_clean == service_id && !id_clean.is_empty() && id_clean.len() <= MAX_ID_PART
    {
        id_clean
    } else {
        let prefix: String = id_clean.chars().take(MAX_ID_PART - 9).collect();
        let prefix = prefix.trim_end_matches('-');
        let hash = format!("{:08x}", fnv1a(service_id.as_bytes()) as u32);
        if prefix.is_empty() {
            hash
        } else {
            format!("{prefix}-{hash}")
        }
    };
    let room = MAX_OBJECT_NAME - "xmod-".len() - id_part.len() - 1;
    let model: String = sanitize(model_name).chars().take(room).collect();
    let model = model.trim_end_matches('-');
    if model.is_empty() {
        format!("xmod-{id_part}")
    } else {
        format!("xmod-{model}-{id_part}")
    }
}

/// Lower-case letters and digits kept, every other run of characters turned into one `-`,
/// no leading or trailing `-`.
fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// 64-bit FNV-1a: a stable hash (std's hasher is randomly seeded and may change between
/// releases; names must not).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Whether `text` is a DNS-1123 label (namespaces, Service names).
pub fn is_dns_label(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= MAX_NAME
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

/// Whether `text` may be a label value: at most 63 characters of letters, digits, `-`, `_`
/// and `.`, beginning and ending with a letter or digit.
pub fn is_label_value(text: &str) -> bool {
    text.len() <= MAX_NAME
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && text
            .bytes()
            .next()
            .is_none_or(|b| b.is_ascii_alphanumeric())
        && text
            .bytes()
            .last()
            .is_none_or(|b| b.is_ascii_alphanumeric())
}

/// The labels that select a service's pods (the Deployment's immutable selector).
pub fn selector_labels(service_id: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), MANAGED_BY_VALUE.to_string()),
        (LABEL_SERVICE_ID.to_string(), service_id.to_string()),
    ])
}

/// Label selector of one service's objects.
pub fn service_selector(service_id: &str) -> String {
    format!("{MANAGED_SELECTOR},{LABEL_SERVICE_ID}={service_id}")
}

/// The service id an object is labelled with.
pub fn service_id_of(labels: Option<&BTreeMap<String, String>>) -> Option<&str> {
    let labels = labels?;
    if labels.get(LABEL_MANAGED_BY).map(String::as_str) != Some(MANAGED_BY_VALUE) {
        return None;
    }
    labels.get(LABEL_SERVICE_ID).map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_deterministic_dns_labels_from_model_and_id() {
        assert_eq!(
            object_name("1a2b3c4d", "Qwen2.5-7B-Instruct"),
            "xmod-qwen2-5-7b-instruct-1a2b3c4d"
        );
        assert_eq!(
            object_name("1a2b3c4d", "Qwen2.5-7B-Instruct"),
            object_name("1a2b3c4d", "Qwen2.5-7B-Instruct")
        );
        assert_eq!(object_name("1a2b3c4d", "__"), "xmod-1a2b3c4d");
        assert_eq!(
            object_name("1a2b3c4d", "meta/Llama 3 (70B)"),
            "xmod-meta-llama-3-70b-1a2b3c4d"
        );
    }

    #[test]
    fn long_or_unusual_ids_stay_unique_and_short() {
        let model = "a-very-long-model-name-that-goes-on-and-on-and-on-forever-and-ever";
        let names = [
            object_name("1a2b3c4d", model),
            object_name("Service_ONE", model),
            object_name("service-one", model),
            object_name("x".repeat(100).as_str(), model),
            object_name(&format!("{}y", "x".repeat(100)), model),
            object_name("---", model),
            object_name("", model),
        ];
        for name in &names {
            assert!(is_dns_label(name), "{name}");
            assert!(name.len() <= MAX_OBJECT_NAME, "{name}");
            assert!(name.starts_with("xmod-"), "{name}");
            assert!(
                name.as_bytes()[0].is_ascii_lowercase(),
                "DNS-1035 wants a letter first: {name}"
            );
        }
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        assert!(names[0].ends_with("-1a2b3c4d"));
        // A sanitised id different from the raw one gets a hash, so "Service_ONE" and
        // "service-one" cannot collide.
        assert!(names[1].starts_with("xmod-a-very-long") && names[1].contains("service-one-"));
    }

    #[test]
    fn label_values_and_selectors() {
        assert!(is_label_value("1a2b3c4d"));
        assert!(is_label_value("t123-serve_x.y"));
        assert!(is_label_value(""));
        assert!(!is_label_value("-x"));
        assert!(!is_label_value("a/b"));
        assert!(!is_label_value(&"x".repeat(64)));
        assert_eq!(
            service_selector("abc"),
            "app.kubernetes.io/managed-by=xmod-shim,xmod-shim/service-id=abc"
        );
        let labels = selector_labels("abc");
        assert_eq!(service_id_of(Some(&labels)), Some("abc"));
        let foreign = BTreeMap::from([(LABEL_SERVICE_ID.to_string(), "abc".to_string())]);
        assert_eq!(service_id_of(Some(&foreign)), None);
    }
}
