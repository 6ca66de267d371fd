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
    pub profile: Profile,
    /// Sequences in the batch, and waiting for a place in it.
    pub running: usize,
    pub waiting: usize,
    /// Cache positions reserved by the running sequences, and the cache's size.
    pub kv_used: usize,
    pub kv_total: usize,
    pub steps: u64,
    pub step_s: f64,
    pub step_tokens: u64,
    /// Tokens (rows) of the last step.
    pub last_batch: usize,
    /// Requests whose prompt is longer than a chunk, those that started after a stored beginning, and
    /// the prompt tokens that saved.
    pub prefix_lookups: u64,
    pub prefix_hits: u64,
    pub prefix_tokens: u64,
    /// Cache positions the stored prompt beginnings hold.
    pub prefix_positions: usize,
    /// Speculative steps, the tokens they drafted and those the model kept.
    pub spec_steps: u64,
    pub spec_drafted: u64,
    pub spec_accepted: u64,
    /// Seconds spent drafting, and in the steps that verified the drafts.
    pub spec_draft_s: f64,
    pub spec_step_s: f64,
    /// Seconds from queueing to the first token, and per further token.
    pub ttft: Histogram,
    pub tpot: Histogram,
}

/// A Prometheus histogram over fixed buckets of seconds.
pub struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    n: u64,
}

/// Bucket bounds in seconds: from a fast decode step to a long prompt's prefill.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS.len()],
            sum: 0.0,
            n: 0,
        }
    }
}

impl Histogram {
    pub fn observe(&mut self, v: f64) {
        for (c, b) in self.counts.iter_mut().zip(BUCKETS) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.n += 1;
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        for (c, b) in self.counts.iter().zip(BUCKETS) {
            out.push_str(&format!("{name}_bucket{{le=\"{b}\"}} {c}\n"));
        }
        out.push_str(&format!(
            "{name}_bucket{{le=\"+Inf\"}} {n}\n{name}_sum {:.6}\n{name}_count {n}\n",
            self.sum,
            n = self.n
        ));
    }
}

impl Metrics {
    /// Counts a step of `rows` tokens that took `secs`, and its time per kind of op.
    pub fn step(&mut self, rows: usize, secs: f64, profile: Profile) {
        self.steps += 1;
        self.step_s += secs;
        self.step_tokens += rows as u64;
        self.last_batch = rows;
        self.profile = profile;
    }

    /// Prometheus' text format, with the gauges only the caller knows.
    pub fn render(&self, queue_depth: usize, uptime_s: f64) -> String {
        let p = &self.profile;
        let total = p.total().max(1) as f64;
        let (c, g) = ("counter", "gauge");
        let rows: [(&str, &str, &str, String); 25] = [
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
                "ringlm_steps_total",
                c,
                "Batched steps run.",
                self.steps.to_string(),
            ),
            (
                "ringlm_step_seconds_total",
                c,
                "Seconds spent in steps.",
                format!("{:.6}", self.step_s),
            ),
            (
                "ringlm_step_tokens_total",
                c,
                "Tokens run in steps (prompt chunks and generated tokens).",
                self.step_tokens.to_string(),
            ),
            (
                "ringlm_batch_tokens",
                g,
                "Tokens in the last step.",
                self.last_batch.to_string(),
            ),
            (
                "ringlm_sequences_running",
                g,
                "Sequences in the batch.",
                self.running.to_string(),
            ),
            (
                "ringlm_sequences_waiting",
                g,
                "Requests waiting for a place in the batch.",
                (self.waiting.max(queue_depth)).to_string(),
            ),
            (
                "ringlm_kv_positions_used",
                g,
                "Cache positions the running sequences reserve.",
                self.kv_used.to_string(),
            ),
            (
                "ringlm_prefix_cache_queries_total",
                c,
                "Requests with a prompt longer than a chunk (those that could reuse a stored beginning).",
                self.prefix_lookups.to_string(),
            ),
            (
                "ringlm_prefix_cache_hits_total",
                c,
                "Requests that started after a stored prompt beginning.",
                self.prefix_hits.to_string(),
            ),
            (
                "ringlm_prefix_cache_tokens_total",
                c,
                "Prompt tokens not run again thanks to stored beginnings.",
                self.prefix_tokens.to_string(),
            ),
            (
                "ringlm_prefix_cache_positions",
                g,
                "Cache positions the stored prompt beginnings hold (they give way to requests).",
                self.prefix_positions.to_string(),
            ),
            (
                "ringlm_kv_positions_total",
                g,
                "Cache positions the KV memory holds.",
                self.kv_total.to_string(),
            ),
            (
                "ringlm_speculative_steps_total",
                c,
                "Steps that verified drafted tokens (prompt lookup, while a sequence runs alone).",
                self.spec_steps.to_string(),
            ),
            (
                "ringlm_speculative_drafted_tokens_total",
                c,
                "Tokens drafted by prompt lookup.",
                self.spec_drafted.to_string(),
            ),
            (
                "ringlm_speculative_accepted_tokens_total",
                c,
                "Drafted tokens the model agreed with: each one a token without a step of its own.",
                self.spec_accepted.to_string(),
            ),
            (
                "ringlm_speculative_draft_seconds_total",
                c,
                "Seconds spent drafting (looking the text up).",
                format!("{:.6}", self.spec_draft_s),
            ),
            (
                "ringlm_speculative_step_seconds_total",
                c,
                "Seconds in the steps that verified drafts (part of ringlm_step_seconds_total).",
                format!("{:.6}", self.spec_step_s),
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
        self.ttft.render(
            "ringlm_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first token.",
            &mut out,
        );
        self.tpot.render(
            "ringlm_time_per_output_token_seconds",
            "Mean seconds per generated token after the first, per request.",
            &mut out,
        );
        out.push_str("# HELP ringlm_step_time_share Share of step time per kind of op, since start.\n# TYPE ringlm_step_time_share gauge\n");
        for (op, v) in [
            ("linear", p.linear),
            ("lfa_conv", p.conv),
            ("attention", p.attention),
            ("allreduce", p.comm),
            ("other", p.other),
        ] {
            out.push_str(&format!(
                "ringlm_step_time_share{{op=\"{op}\"}} {:.4}\n",
                v as f64 / total
            ));
        }
        out
    }
}
