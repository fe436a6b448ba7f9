//! Renders the Envoy bootstrap from `envoy/bootstrap.yaml.tmpl` for a given config: ports, the
//! filter's configuration and one cluster per real provider.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::json;

use crate::config::Config;
use crate::providers::{Upstream, HTTP_CLUSTER};

const TEMPLATE: &str = include_str!("../../envoy/bootstrap.yaml.tmpl");
/// CA bundle for TLS to providers (Debian/Ubuntu path; Envoy needs a file).
const CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// How often each Envoy worker's filter polls the control plane for a newer policy snapshot.
pub const FILTER_SYNC_INTERVAL_MS: u64 = 200;

/// The JSON the filter reads at configure time (its key comes from Envoy's environment:
/// [`aex_proto::FILTER_KEY_ENV`]).
pub fn filter_config(config: &Config) -> String {
    json!({
        "control_plane_cluster": "aex_control_plane",
        "sync_interval_ms": FILTER_SYNC_INTERVAL_MS,
        "grpc_timeout_ms": 5000,
        "max_body_bytes": config.max_body_bytes,
    })
    .to_string()
}

fn yaml_str(s: &str) -> String {
    // JSON strings are valid YAML scalars.
    serde_json::Value::String(s.to_string()).to_string()
}

/// The CDS file: one cluster per real provider (mocked providers use the static `aex_http`).
pub fn render_clusters(upstreams: &[Upstream]) -> String {
    let mut seen = BTreeSet::new();
    let mut out = String::from(
        "# Provider clusters for Envoy (CDS), written by the AEX control plane.\nresources:\n",
    );
    for u in upstreams {
        let Some(def) = &u.def else { continue };
        if u.cluster == HTTP_CLUSTER || !seen.insert(u.cluster.clone()) {
            continue;
        }
        let is_ip = def.host.parse::<std::net::IpAddr>().is_ok();
        out.push_str(&format!(
            "- \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\n  name: {name}\n  type: {kind}\n  dns_lookup_family: V4_PREFERRED\n  connect_timeout: 10s\n  load_assignment:\n    cluster_name: {name}\n    endpoints:\n    - lb_endpoints:\n      - endpoint: {{ address: {{ socket_address: {{ address: {host}, port_value: {port} }} }} }}\n",
            name = yaml_str(&u.cluster),
            kind = if is_ip { "STATIC" } else { "LOGICAL_DNS" },
            host = yaml_str(&def.host),
            port = def.port,
        ));
        if def.tls {
            let ca = CA_BUNDLES
                .iter()
                .find(|p| Path::new(p).exists())
                .unwrap_or(&CA_BUNDLES[0]);
            out.push_str(&format!(
                "  transport_socket:\n    name: envoy.transport_sockets.tls\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n      sni: {sni}\n      common_tls_context:\n        validation_context:\n          trusted_ca: {{ filename: {ca} }}\n",
                sni = yaml_str(&def.host),
                ca = yaml_str(ca),
            ));
        }
    }
    if seen.is_empty() {
        out = out.replace("resources:\n", "resources: []\n");
    }
    out
}

pub fn render(config: &Config, filter_path: &Path, cds_path: &Path) -> String {
    // The filter config goes inside a single-quoted YAML scalar: double any single quote.
    let fc = filter_config(config).replace('\'', "''");
    let cds_dir = cds_path.parent().unwrap_or(Path::new("/"));
    TEMPLATE
        .replace("{{envoy_port}}", &config.envoy_port.to_string())
        .replace("{{admin_port}}", &config.envoy_admin_port.to_string())
        .replace("{{grpc_port}}", &config.grpc_port.to_string())
        .replace("{{http_port}}", &config.http_port.to_string())
        .replace(
            "{{buffer_limit}}",
            &(config.max_body_bytes + (1 << 20)).to_string(),
        )
        .replace("{{max_body_bytes}}", &config.max_body_bytes.to_string())
        .replace("{{filter_path}}", &filter_path.display().to_string())
        .replace("{{filter_config}}", &fc)
        .replace("{{filter_key_env}}", aex_proto::FILTER_KEY_ENV)
        .replace("{{cds_path}}", &cds_path.display().to_string())
        .replace("{{cds_dir}}", &cds_dir.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Catalog, DEFAULT_CONFIG_TOML, DEFAULT_MODELS_TOML};

    #[test]
    fn renders_every_placeholder() {
        let cfg = Config::parse(DEFAULT_CONFIG_TOML, "c").unwrap();
        let cat = Catalog::parse(DEFAULT_MODELS_TOML, "m").unwrap();
        let ups = crate::providers::resolve(
            &cat,
            &Config {
                mock_fallback: false,
                ..cfg.clone()
            },
            &Default::default(),
        );
        let y = render(
            &cfg,
            Path::new("/x/aex_filter.wasm"),
            Path::new("/h/envoy/cds/clusters.yaml"),
        );
        assert!(!y.contains("{{"), "{y}");
        // The key is never in the file (Envoy's admin serves it): only the variable's name.
        assert!(!y.contains("filter_key"), "{y}");
        assert!(y.contains(r#"host_env_keys: ["AEX_FILTER_KEY"]"#), "{y}");
        assert!(y.contains("watched_directory: { path: \"/h/envoy/cds\" }"));
        let c = render_clusters(&ups);
        assert!(c.contains("provider_groq"));
        assert!(c.contains("sni: \"api.groq.com\""));
        let mocked = crate::providers::resolve(&cat, &cfg, &Default::default());
        assert!(render_clusters(&mocked).contains("resources: []"));
    }

    /// `envoy/examples/` holds what the control plane renders for the default config.toml and
    /// models.toml (both providers keyed, so no mock), for readers and for deployments that
    /// manage Envoy themselves. It must not drift from the templates: regenerate it with
    /// `AEX_WRITE_EXAMPLES=1 cargo test -p aex-control-plane envoy::tests::examples`.
    #[test]
    fn examples_are_what_the_default_config_renders() {
        let cfg = Config::parse(DEFAULT_CONFIG_TOML, "c").unwrap();
        let cat = Catalog::parse(DEFAULT_MODELS_TOML, "m").unwrap();
        let keyed = Config {
            mock_fallback: false,
            ..cfg.clone()
        };
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../envoy/examples");
        let rendered = [
            (
                "envoy.yaml",
                render(
                    &cfg,
                    Path::new("/home/you/.aex/aex_filter.wasm"),
                    Path::new("/home/you/.aex/envoy/cds/clusters.yaml"),
                ),
            ),
            (
                "clusters.yaml",
                render_clusters(&crate::providers::resolve(
                    &cat,
                    &keyed,
                    &Default::default(),
                )),
            ),
        ];
        // The CA bundle is the first of CA_BUNDLES this machine has: the example names the first.
        let ca = CA_BUNDLES
            .iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or(&CA_BUNDLES[0]);
        for (name, text) in rendered {
            let text = text.replace(ca, CA_BUNDLES[0]);
            let path = examples.join(name);
            if std::env::var_os("AEX_WRITE_EXAMPLES").is_some() {
                std::fs::write(&path, &text).unwrap();
            }
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                on_disk == text,
                "{} is not what the templates render: regenerate it with AEX_WRITE_EXAMPLES=1 cargo test -p aex-control-plane envoy::tests::examples",
                path.display()
            );
        }
    }
}
