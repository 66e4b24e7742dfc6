//! Building identity label sets from what the world tells us: Kubernetes pods, CIDRs and
//! `toFQDNs` selectors.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::filter::LabelFilter;
use crate::labels::{Label, LabelSet, LabelSource};

/// Key of the label that carries a pod's namespace.
pub const POD_NAMESPACE_KEY: &str = "io.kubernetes.pod.namespace";
/// Prefix of the keys that carry the labels of a pod's namespace.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// Key of the label that carries a pod's service account.
pub const SERVICE_ACCOUNT_KEY: &str = "io.cilium.k8s.policy.serviceaccount";
/// Key of the label that carries the cluster name.
pub const CLUSTER_KEY: &str = "io.cilium.k8s.policy.cluster";

/// The identity labels of a pod: its own labels plus the labels Cilium derives from its
/// namespace, the namespace's labels, its service account and the cluster, all with source
/// `k8s:`, then passed through `filter`.
///
/// Derived labels win over pod labels with the same key, so a pod cannot claim another
/// namespace through its own labels. An empty `service_account` or `cluster_name` adds no label.
pub fn pod_identity_labels<P, PK, PV, N, NK, NV>(
    namespace: &str,
    pod_labels: P,
    namespace_labels: N,
    service_account: &str,
    cluster_name: &str,
    filter: &LabelFilter,
) -> LabelSet
where
    P: IntoIterator<Item = (PK, PV)>,
    PK: AsRef<str>,
    PV: AsRef<str>,
    N: IntoIterator<Item = (NK, NV)>,
    NK: AsRef<str>,
    NV: AsRef<str>,
{
    let mut set = LabelSet::new();
    for (k, v) in pod_labels {
        if !k.as_ref().is_empty() {
            set.insert(Label::k8s(k.as_ref(), v.as_ref()));
        }
    }
    for (k, v) in namespace_labels {
        if !k.as_ref().is_empty() {
            set.insert(Label::k8s(
                format!("{NAMESPACE_LABELS_PREFIX}{}", k.as_ref()),
                v.as_ref(),
            ));
        }
    }
    set.insert(Label::k8s(POD_NAMESPACE_KEY, namespace));
    if !service_account.is_empty() {
        set.insert(Label::k8s(SERVICE_ACCOUNT_KEY, service_account));
    }
    if !cluster_name.is_empty() {
        set.insert(Label::k8s(CLUSTER_KEY, cluster_name));
    }
    filter.filter(&set)
}

/// The label key Cilium writes for a CIDR: the network address and prefix length, with IPv6
/// colons written as `-` (a `:` would read as a source separator), e.g. `10.0.0.0/8`,
/// `2001-db8--/32`, and `0--/0` for `::/0` (a key may not start with `-`).
pub fn cidr_label_key(prefix: IpNet) -> String {
    let net = prefix.trunc();
    match net.addr() {
        IpAddr::V4(a) => format!("{a}/{}", net.prefix_len()),
        IpAddr::V6(a) => {
            let mut s = a.to_string().replace(':', "-");
            if s.starts_with('-') {
                s.insert(0, '0');
            }
            format!("{s}/{}", net.prefix_len())
        }
    }
}

/// Parses a CIDR label key written by [`cidr_label_key`] (IPv6 in `-` or `:` form).
/// Host bits are cleared.
pub fn parse_cidr_label_key(key: &str) -> Option<IpNet> {
    let net: IpNet = if key.contains('-') {
        key.replace('-', ":").parse().ok()?
    } else {
        key.parse().ok()?
    };
    Some(net.trunc())
}

/// The labels of a CIDR identity: `cidr:<prefix>` and `reserved:world`.
pub fn cidr_labels(prefix: IpNet) -> LabelSet {
    let mut s = LabelSet::new();
    s.insert(Label::new(LabelSource::Cidr, cidr_label_key(prefix), ""));
    s.insert(Label::reserved("world"));
    s
}

/// The labels of an identity for IPs learned through `toFQDNs`: one `fqdn:<selector>` label per
/// selector that selected the name (as written in the policy), and `reserved:world`.
pub fn fqdn_labels<I, S>(selectors: I) -> LabelSet
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut s = LabelSet::new();
    for sel in selectors {
        if !sel.as_ref().is_empty() {
            s.insert(Label::new(LabelSource::Fqdn, sel.as_ref(), ""));
        }
    }
    s.insert(Label::reserved("world"));
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn pod_labels() {
        let pod = BTreeMap::from([
            ("app".to_string(), "web".to_string()),
            ("pod-template-hash".to_string(), "abc".to_string()),
            (POD_NAMESPACE_KEY.to_string(), "spoofed".to_string()),
        ]);
        let ns = [("team", "a"), ("kubernetes.io/metadata.name", "prod")];
        let set = pod_identity_labels(
            "prod",
            &pod,
            ns,
            "web-sa",
            "default",
            &LabelFilter::default(),
        );
        let text = set.to_string();
        assert_eq!(
            text,
            "k8s:app=web,\
             k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=prod,\
             k8s:io.cilium.k8s.namespace.labels.team=a,\
             k8s:io.cilium.k8s.policy.cluster=default,\
             k8s:io.cilium.k8s.policy.serviceaccount=web-sa,\
             k8s:io.kubernetes.pod.namespace=prod"
        );
        let bare = pod_identity_labels(
            "x",
            Vec::<(String, String)>::new(),
            Vec::<(String, String)>::new(),
            "",
            "",
            &LabelFilter::default(),
        );
        assert_eq!(bare.to_string(), "k8s:io.kubernetes.pod.namespace=x");
    }

    #[test]
    fn cidr_keys() {
        let v4: IpNet = "10.1.2.3/8".parse().unwrap();
        assert_eq!(cidr_label_key(v4), "10.0.0.0/8");
        let v6: IpNet = "2001:db8::1/32".parse().unwrap();
        assert_eq!(cidr_label_key(v6), "2001-db8--/32");
        let all6: IpNet = "::/0".parse().unwrap();
        assert_eq!(cidr_label_key(all6), "0--/0");
        for net in [v4, v6, all6] {
            assert_eq!(
                parse_cidr_label_key(&cidr_label_key(net)),
                Some(net.trunc())
            );
        }
        assert_eq!(parse_cidr_label_key("garbage"), None);
        assert_eq!(
            cidr_labels(v4).to_string(),
            "reserved:world,cidr:10.0.0.0/8"
        );
    }

    #[test]
    fn fqdn() {
        assert_eq!(
            fqdn_labels(["*.example.com", "api.stripe.com"]).to_string(),
            "reserved:world,fqdn:*.example.com,fqdn:api.stripe.com"
        );
    }
}
