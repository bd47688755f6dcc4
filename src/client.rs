//! The client commands of the `calmkv` binary: one HTTP request each (two for
//! `put`, which reads the context first), printing values and clear errors.

use crate::Command;
use anyhow::{anyhow, bail, Context as _};
use clap::Args;
use reqwest::header::HeaderValue;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value as Json;
use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

/// Where the node is.
#[derive(Args, Clone)]
pub struct Conn {
    /// The node's HTTP URL.
    #[arg(long, env = "CALMKV_URL", default_value = "http://127.0.0.1:7070")]
    url: String,
    /// Bearer token, if the node requires one.
    #[arg(long, env = "CALMKV_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// Give up on a request after this many milliseconds.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Trust this PEM CA certificate for an https:// --url (the only one
    /// trusted: there are no built-in roots).
    #[arg(long, env = "CALMKV_CA_CERT")]
    ca_cert: Option<std::path::PathBuf>,
    /// Writes: the `Idempotency-Key` to send (default: a fresh random one per
    /// command). A coordinated operation retried with the same key is applied
    /// once; the server ignores the key on local operations.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Writes: how many times to resend after `503 coordination_unavailable`,
    /// with the same idempotency key (safe: the quorum answers a repeat with
    /// its first outcome).
    #[arg(long, default_value_t = 2)]
    retries: u32,
}

struct Client {
    http: reqwest::Client,
    conn: Conn,
}

impl Client {
    fn new(conn: Conn) -> anyhow::Result<Client> {
        let mut builder =
            reqwest::Client::builder().timeout(Duration::from_millis(conn.timeout_ms));
        if let Some(path) = &conn.ca_cert {
            let pem = std::fs::read(path)
                .with_context(|| format!("cannot read the CA certificate {}", path.display()))?;
            let ca = reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("{} is not a PEM certificate", path.display()))?;
            builder = builder.add_root_certificate(ca);
        }
        let http = builder.build()?;
        Ok(Client { http, conn })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let url = format!("{}{path}", self.conn.url.trim_end_matches('/'));
        let request = self.http.request(method, url);
        match &self.conn.auth_token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends a request; turns an error answer into an error naming its code.
    async fn send(&self, request: RequestBuilder) -> anyhow::Result<Response> {
        let response =
            request.send().await.with_context(|| format!("cannot reach {}", self.conn.url))?;
        let status = response.status();
        if status.is_success() || status == StatusCode::MULTIPLE_CHOICES {
            return Ok(response);
        }
        Err(error_of(response).await)
    }

    /// Sends a write built by `build` with an idempotency key, resending it
    /// with the same key after `503 coordination_unavailable` (at most
    /// `--retries` times, `Retry-After` apart). Only that answer is retried:
    /// it comes from coordinated operations alone, which honour the key, and
    /// says the operation was not applied or may have been (so a repeat under
    /// the same key is answered with the first outcome). A transport error is
    /// not retried: a local operation ignores the key.
    async fn send_write(&self, build: impl Fn() -> RequestBuilder) -> anyhow::Result<Response> {
        let key = match &self.conn.idempotency_key {
            Some(key) => key.clone(),
            None => format!("{:032x}", rand::random::<u128>()),
        };
        let mut attempt = 0;
        loop {
            let request = build().header("Idempotency-Key", key.as_str());
            let response =
                request.send().await.with_context(|| format!("cannot reach {}", self.conn.url))?;
            let status = response.status();
            if status.is_success() || status == StatusCode::MULTIPLE_CHOICES {
                return Ok(response);
            }
            let wait = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .unwrap_or(1)
                .min(RETRY_AFTER_SECS_MAX);
            let body = response.text().await.unwrap_or_default();
            let json: Option<Json> = serde_json::from_str(&body).ok();
            let code = json.as_ref().and_then(|j| j["error"]["code"].as_str());
            if status == StatusCode::SERVICE_UNAVAILABLE
                && code == Some("coordination_unavailable")
                && attempt < self.conn.retries
            {
                attempt += 1;
                let applied = json.as_ref().and_then(|j| j["error"]["applied"].as_str());
                eprintln!(
                    "coordination unavailable (applied: {}); retry {attempt} of {} with idempotency key {key}",
                    applied.unwrap_or("unknown"),
                    self.conn.retries
                );
                tokio::time::sleep(Duration::from_secs(wait)).await;
                continue;
            }
            return Err(error_from(status, &body));
        }
    }

    /// The context token of the key's current value, to write over it: `None`
    /// when the key is absent. Any other failed read is an error, not "no
    /// context": writing without one would add a sibling instead of replacing.
    async fn current_context(&self, key: &str) -> anyhow::Result<Option<HeaderValue>> {
        let read = self.request(Method::GET, &kv_path(key));
        let response =
            read.send().await.with_context(|| format!("cannot reach {}", self.conn.url))?;
        let status = response.status();
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !(status.is_success() || status == StatusCode::MULTIPLE_CHOICES) {
            let error = error_of(response).await;
            return Err(error.context(format!("cannot read the context of {key:?} to replace it")));
        }
        Ok(response.headers().get("x-context").cloned())
    }

    async fn crdt(&self, key: &str, op: Json) -> anyhow::Result<Json> {
        let path = kv_path(key);
        let response = self.send_write(|| self.request(Method::POST, &path).json(&op)).await?;
        Ok(response.json().await?)
    }
}

/// The longest `Retry-After` the CLI honours between retries, in seconds.
const RETRY_AFTER_SECS_MAX: u64 = 10;

/// An error answer as an error naming its stable code: `code: message (status)`.
async fn error_of(response: Response) -> anyhow::Error {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    error_from(status, &body)
}

/// [`error_of`] for a body already read; a coordination failure says whether
/// the operation was applied (`applied: no|unknown`).
fn error_from(status: StatusCode, body: &str) -> anyhow::Error {
    let error = serde_json::from_str::<Json>(body).ok().and_then(|j| {
        let code = j["error"]["code"].as_str()?.to_string();
        let message = j["error"]["message"].as_str()?.to_string();
        Some(match j["error"]["applied"].as_str() {
            Some(applied) => anyhow!("{code}: {message} (applied: {applied}) ({status})"),
            None => anyhow!("{code}: {message} ({status})"),
        })
    });
    error.unwrap_or_else(|| anyhow!("{status}: {body}"))
}

fn kv_path(key: &str) -> String {
    let encoded: String = key.split('/').map(percent_encode).collect::<Vec<_>>().join("/");
    format!("/v1/kv/{encoded}")
}

fn percent_encode(segment: &str) -> String {
    let mut out = String::new();
    for byte in segment.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// The non-zero refusal counts of a `/v1/cluster` answer on one line, with a
/// hint when a secret mismatch is among them; `None` when nothing was refused.
fn refusals_line(refusals: &Json) -> Option<String> {
    let mut parts = Vec::new();
    let mut collect = |what: &str, counts: &Json| {
        for (kind, n) in counts.as_object().into_iter().flatten() {
            if n.as_u64().is_some_and(|n| n > 0) {
                parts.push(format!("{what} {kind}={n}"));
            }
        }
    };
    collect("peer handshakes", &refusals["peer_handshakes"]);
    collect("gossip", &refusals["gossip"]);
    for (what, name) in [("peer frames", "peer_frames"), ("remote states", "remote_states")] {
        if refusals[name].as_u64().is_some_and(|n| n > 0) {
            parts.push(format!("{what}={}", refusals[name]));
        }
    }
    if parts.is_empty() {
        return None;
    }
    let mismatch =
        parts.iter().any(|p| p.contains("wrong_secret") || p.contains("secret_mismatch"));
    let hint = if mismatch { " (a node with another --cluster-secret?)" } else { "" };
    Some(format!("refused since start: {}{hint}", parts.join(", ")))
}

/// One line per member of a `/v1/cluster` answer, the answering node first,
/// then what the node refused from others, if anything.
fn print_members(cluster: &Json) {
    let field = |m: &Json, name: &str| match &m[name] {
        Json::String(text) => text.clone(),
        Json::Null => "-".to_string(),
        other => other.to_string(),
    };
    println!(
        "{:<16}  {:<7}  {:>4}  {:<21}  {:<21}  {:<21}",
        "ID", "STATE", "INC", "HTTP", "GOSSIP", "PEER"
    );
    let own = field(&cluster["node"], "id");
    for member in cluster["members"].as_array().into_iter().flatten() {
        let id = field(member, "id");
        let marker = if id == own { " (this node)" } else { "" };
        println!(
            "{:<16}  {:<7}  {:>4}  {:<21}  {:<21}  {:<21}{marker}",
            id,
            field(member, "state"),
            field(member, "incarnation"),
            field(member, "http_addr"),
            field(member, "gossip_addr"),
            field(member, "peer_addr"),
        );
    }
    if let Some(line) = refusals_line(&cluster["refusals"]) {
        println!("{line}");
    }
}

fn print_json(json: &Json) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(json)?);
    Ok(())
}

fn read_value(value: Option<String>, file: Option<std::path::PathBuf>) -> anyhow::Result<Vec<u8>> {
    match (value, file) {
        (Some(value), None) => Ok(value.into_bytes()),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut bytes = Vec::new();
            std::io::stdin().read_to_end(&mut bytes)?;
            Ok(bytes)
        }
        (None, Some(path)) => {
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))
        }
        _ => bail!("give a value or --file"),
    }
}

/// Runs a client command.
pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(_) | Command::Demo(_) => unreachable!("not a client command"),
        Command::Explain { key, op, invariants: Some(path), .. } => {
            let invariants = calmkv::invariants::Invariants::load(&path)?;
            let answer = match (key, op) {
                (Some(key), Some(op)) => calmkv::http::invariants::explain(&invariants, &key, &op)
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
                (None, _) => calmkv::http::invariants::describe(&invariants),
                (Some(_), None) => anyhow::bail!(
                    "give an operation after the key, e.g. `explain account/alice decr`"
                ),
            };
            print_json(&answer)
        }
        Command::Explain { key, op, invariants: None, conn } => {
            let client = Client::new(conn)?;
            let request = match (key, op) {
                (Some(key), Some(op)) => {
                    client.request(Method::GET, "/v1/explain").query(&[("key", key), ("op", op)])
                }
                (None, _) => client.request(Method::GET, "/v1/invariants"),
                (Some(_), None) => anyhow::bail!(
                    "give an operation after the key, e.g. `explain account/alice decr`"
                ),
            };
            print_json(&client.send(request).await?.json().await?)
        }
        Command::ReplaceVoter { dead, new_id, addr, conn } => {
            let client = Client::new(conn)?;
            let body = serde_json::json!({ "dead": dead, "id": new_id, "addr": addr });
            let request = client.request(Method::POST, "/v1/quorum/replace").json(&body);
            print_json(&client.send(request).await?.json().await?)
        }
        Command::Members { conn } => {
            let client = Client::new(conn)?;
            let cluster: Json =
                client.send(client.request(Method::GET, "/v1/cluster")).await?.json().await?;
            print_members(&cluster);
            Ok(())
        }
        Command::Get { key, conn } => {
            let client = Client::new(conn)?;
            let response = client.send(client.request(Method::GET, &kv_path(&key))).await?;
            let is_json = response
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
            if is_json {
                print_json(&response.json().await?)
            } else {
                let bytes = response.bytes().await?;
                let mut out = std::io::stdout().lock();
                out.write_all(&bytes)?;
                // A newline for the terminal's sake only: piped or redirected,
                // the output is the value, byte for byte.
                if out.is_terminal() && !bytes.ends_with(b"\n") {
                    out.write_all(b"\n")?;
                }
                Ok(())
            }
        }
        Command::Put { key, value, file, context, sibling, if_absent, lww, conn } => {
            let client = Client::new(conn)?;
            let value = read_value(value, file)?;
            let context = match context {
                Some(token) => Some(HeaderValue::from_str(&token)?),
                None if !sibling && !lww && !if_absent => client.current_context(&key).await?,
                None => None,
            };
            let path = kv_path(&key);
            let build = || {
                let mut request = client.request(Method::PUT, &path).body(value.clone());
                if lww {
                    request = request.query(&[("type", "lww")]);
                } else if if_absent {
                    request = request.header("If-None-Match", "*");
                } else if let Some(token) = &context {
                    request = request.header("X-Context", token.clone());
                }
                request
            };
            client.send_write(build).await?;
            Ok(())
        }
        Command::Del { key, context, conn } => {
            let client = Client::new(conn)?;
            let path = kv_path(&key);
            let build = || {
                let request = client.request(Method::DELETE, &path);
                match &context {
                    Some(token) => request.header("X-Context", token.as_str()),
                    None => request,
                }
            };
            client.send_write(build).await?;
            Ok(())
        }
        Command::Incr { key, amount, conn } => {
            let json = Client::new(conn)?
                .crdt(&key, serde_json::json!({"counter": {"incr": amount}}))
                .await?;
            print_json(&json["value"])
        }
        Command::Decr { key, amount, conn } => {
            let json = Client::new(conn)?
                .crdt(&key, serde_json::json!({"counter": {"decr": amount}}))
                .await?;
            print_json(&json["value"])
        }
        Command::Sadd { key, members, conn } => {
            let json =
                Client::new(conn)?.crdt(&key, serde_json::json!({"set": {"add": members}})).await?;
            print_json(&json["value"])
        }
        Command::Srem { key, members, conn } => {
            let json = Client::new(conn)?
                .crdt(&key, serde_json::json!({"set": {"remove": members}}))
                .await?;
            print_json(&json["value"])
        }
        Command::Scan { prefix, limit, all, max_pages, cursor, conn } => {
            let client = Client::new(conn)?;
            let mut cursor = cursor;
            for _ in 0..max_pages.max(1) {
                let mut query = vec![("prefix", prefix.clone()), ("limit", limit.to_string())];
                if let Some(c) = &cursor {
                    query.push(("cursor", c.clone()));
                }
                let page: Json = client
                    .send(client.request(Method::GET, "/v1/kv").query(&query))
                    .await?
                    .json()
                    .await?;
                for entry in page["keys"].as_array().into_iter().flatten() {
                    let types: Vec<&str> = entry["types"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Json::as_str)
                        .collect();
                    println!("{}\t{}", entry["key"].as_str().unwrap_or_default(), types.join(","));
                }
                cursor = page["cursor"].as_str().map(str::to_string);
                if cursor.is_none() || !all {
                    break;
                }
            }
            match (&cursor, all) {
                (Some(c), false) => eprintln!("more keys follow; next page: --cursor {c:?} (or --all)"),
                (Some(c), true) => eprintln!(
                    "more keys follow after {max_pages} pages (--max-pages); next page: --cursor {c:?}"
                ),
                (None, _) => {}
            }
            Ok(())
        }
    }
}
