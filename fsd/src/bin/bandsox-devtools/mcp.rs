//! `mcp --socket SOCK STEP...`: an MCP client (rmcp's, streamable HTTP over the API's
//! Unix socket) for tests. Steps run in order: `tools` prints the tool names, one a
//! line; `TOOL=JSON` calls a tool and prints `ok: TEXT` or `error: TEXT`.
use std::time::Duration;

use rmcp::model::{CallToolRequestParams, ClientConfig};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::ServiceExt;

pub async fn run(socket: &str, timeout: Duration, steps: &[String]) -> Result<(), String> {
    let transport =
        StreamableHttpClientTransport::from_unix_socket(socket, "http://localhost/v1/mcp");
    let client = tokio::time::timeout(timeout, ClientConfig::default().serve(transport))
        .await
        .map_err(|_| "initialize timed out".to_string())?
        .map_err(|e| format!("initialize: {e}"))?;
    for step in steps {
        if step == "tools" {
            let tools = tokio::time::timeout(timeout, client.list_all_tools())
                .await
                .map_err(|_| "tools/list timed out".to_string())?
                .map_err(|e| format!("tools/list: {e}"))?;
            for t in tools {
                println!("{}", t.name);
            }
            continue;
        }
        let (tool, args) = step.split_once('=').unwrap_or((step.as_str(), "{}"));
        let args: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(args).map_err(|e| format!("{step}: arguments: {e}"))?;
        let res = tokio::time::timeout(
            timeout,
            client.call_tool(CallToolRequestParams::new(tool.to_string()).with_arguments(args)),
        )
        .await
        .map_err(|_| format!("{tool} timed out"))?
        .map_err(|e| format!("{tool}: {e}"))?;
        let text: Vec<String> = res
            .content
            .iter()
            .filter_map(|c| c.as_text().map(|t| t.text.clone()))
            .collect();
        let tag = if res.is_error == Some(true) {
            "error"
        } else {
            "ok"
        };
        println!("{tag}: {}", text.join("\n"));
    }
    let _ = client.cancel().await;
    Ok(())
}
