//! The server's counters and their Prometheus text (names as Prometheus expects: `*_total`, `*_seconds`).

use model::arch::Profile;

/// Everything `/metrics` reports, updated by the scheduler and the routes.
#[derive(Default)]
pub struct Metrics {
    pub requests: u64,
    pub rejected_full: u64,
    pub rejected_bad: u64,
    pub rejected_auth: u64,
    pub cancelled: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub busy: bool,
    pub profile: Profile,
    pub last_decode_tps: f64,
}

impl Metrics {
    /// Prometheus' text format, with the gauges only the caller knows.
    pub fn render(&self, queue_depth: usize, uptime_s: f64) -> String {
        let p = &self.profile;
        let total = p.total().max(1) as f64;
        let (c, g) = ("counter", "gauge");
        let rows: [(&str, &str, &str, String); 13] = [
            (
                "ringlm_requests_total",
                c,
                "Requests answered.",
                self.requests.to_string(),
            ),
            (
                "ringlm_requests_cancelled_total",
                c,
                "Requests whose client left before the end.",
                self.cancelled.to_string(),
            ),
            (
                "ringlm_requests_rejected_queue_full_total",
                c,
                "Requests refused with 429.",
                self.rejected_full.to_string(),
            ),
            (
                "ringlm_requests_rejected_invalid_total",
                c,
                "Requests refused with 400.",
                self.rejected_bad.to_string(),
            ),
            (
                "ringlm_requests_rejected_auth_total",
                c,
                "Requests refused with 401.",
                self.rejected_auth.to_string(),
            ),
            (
                "ringlm_prompt_tokens_total",
                c,
                "Prompt tokens processed.",
                self.prompt_tokens.to_string(),
            ),
            (
                "ringlm_generation_tokens_total",
                c,
                "Tokens generated.",
                self.completion_tokens.to_string(),
            ),
            (
                "ringlm_prefill_tokens_per_second",
                g,
                "Prompt tokens per second of prefill, over all requests.",
                format!(
                    "{:.3}",
                    self.prompt_tokens as f64 / self.prefill_s.max(1e-9)
                ),
            ),
            (
                "ringlm_decode_tokens_per_second",
                g,
                "Generated tokens per second of decode, over all requests.",
                format!(
                    "{:.3}",
                    self.completion_tokens as f64 / self.decode_s.max(1e-9)
                ),
            ),
            (
                "ringlm_last_decode_tokens_per_second",
                g,
                "Decode speed of the last request.",
                format!("{:.3}", self.last_decode_tps),
            ),
            (
                "ringlm_queue_depth",
                g,
                "Requests waiting.",
                queue_depth.to_string(),
            ),
            (
                "ringlm_busy",
                g,
                "1 while a request runs.",
                u8::from(self.busy).to_string(),
            ),
            (
                "ringlm_uptime_seconds",
                g,
                "Seconds since start.",
                format!("{uptime_s:.1}"),
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in rows {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
        out.push_str("# HELP ringlm_decode_time_share Share of decode time per kind of op, all requests.\n# TYPE ringlm_decode_time_share gauge\n");
        for (op, v) in [
            ("linear", p.linear),
            ("lfa_conv", p.conv),
            ("attention", p.attention),
            ("allreduce", p.comm),
            ("other", p.other),
        ] {
            out.push_str(&format!(
                "ringlm_decode_time_share{{op=\"{op}\"}} {:.4}\n",
                v as f64 / total
            ));
        }
        out
    }
}
