//! Counters for `GET /metrics`, in Prometheus' text exposition format (version 0.0.4). Written
//! by hand: a handful of counters, gauges and one histogram do not justify a metrics framework.

use kiln_engine::Stats;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the time-to-first-token histogram.
const TTFT_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    embedding_inputs: AtomicU64,
    ttft: Mutex<Histogram>,
}

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; TTFT_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
    pub fn request(&self, endpoint: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((endpoint.to_string(), status)).or_default() += 1;
    }

    pub fn tokens(&self, prompt: usize, completion: usize) {
        self.prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion as u64, Ordering::Relaxed);
    }

    pub fn embeddings(&self, inputs: usize, tokens: usize) {
        self.embedding_inputs
            .fetch_add(inputs as u64, Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
    }

    pub fn time_to_first_token(&self, t: Duration) {
        let s = t.as_secs_f64();
        let mut h = self.ttft.lock().unwrap_or_else(|e| e.into_inner());
        for (c, &b) in h.counts.iter_mut().zip(&TTFT_BUCKETS) {
            if s <= b {
                *c += 1;
            }
        }
        h.count += 1;
        h.sum += s;
    }

    /// The exposition text, with the scheduler's current state.
    pub fn render(&self, stats: Option<&Stats>) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP kiln_requests_total HTTP requests by endpoint and status code."
        );
        let _ = writeln!(o, "# TYPE kiln_requests_total counter");
        for ((endpoint, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                o,
                "kiln_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        let counter = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let gauge = |o: &mut String, name: &str, help: &str, v: String| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        counter(
            &mut o,
            "kiln_prompt_tokens_total",
            "Prompt and embedding input tokens received.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut o,
            "kiln_completion_tokens_total",
            "Tokens generated for responses.",
            self.completion_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut o,
            "kiln_embedding_inputs_total",
            "Texts embedded.",
            self.embedding_inputs.load(Ordering::Relaxed),
        );
        {
            let h = self.ttft.lock().unwrap_or_else(|e| e.into_inner());
            let name = "kiln_time_to_first_token_seconds";
            let _ = writeln!(
                o,
                "# HELP {name} From request arrival in the scheduler to the first generated token."
            );
            let _ = writeln!(o, "# TYPE {name} histogram");
            for (c, b) in h.counts.iter().zip(&TTFT_BUCKETS) {
                let _ = writeln!(o, "{name}_bucket{{le=\"{b}\"}} {c}");
            }
            let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(o, "{name}_sum {}", h.sum);
            let _ = writeln!(o, "{name}_count {}", h.count);
        }
        if let Some(s) = stats {
            gauge(
                &mut o,
                "kiln_queue_depth",
                "Requests waiting for a place in the running batch.",
                s.queued.to_string(),
            );
            gauge(
                &mut o,
                "kiln_running_sequences",
                "Sequences in the running batch.",
                s.running.to_string(),
            );
            gauge(
                &mut o,
                "kiln_kv_blocks_total",
                "KV cache blocks in the pool.",
                s.blocks_total.to_string(),
            );
            gauge(
                &mut o,
                "kiln_kv_blocks_in_use",
                "KV cache blocks referenced by running sequences.",
                s.blocks_in_use.to_string(),
            );
            counter(
                &mut o,
                "kiln_scheduler_steps_total",
                "Batched forward steps.",
                s.steps,
            );
            counter(
                &mut o,
                "kiln_generated_tokens_total",
                "Tokens sampled by the scheduler.",
                s.generated_tokens,
            );
            counter(
                &mut o,
                "kiln_prompt_tokens_computed_total",
                "Prompt tokens run through the model.",
                s.prompt_tokens_computed,
            );
            counter(
                &mut o,
                "kiln_prompt_tokens_cached_total",
                "Prompt tokens served from the prefix cache.",
                s.prompt_tokens_cached,
            );
            counter(
                &mut o,
                "kiln_preemptions_total",
                "Sequences preempted for KV memory and recomputed.",
                s.preemptions,
            );
            let busy = s.busy.as_secs_f64();
            let tps = if busy > 0.0 {
                s.generated_tokens as f64 / busy
            } else {
                0.0
            };
            gauge(
                &mut o,
                "kiln_tokens_per_second",
                "Generated tokens per second of model time since start.",
                format!("{tps:.3}"),
            );
            let _ = writeln!(o, "# HELP kiln_model_seconds_total Seconds spent in batched forward steps.\n# TYPE kiln_model_seconds_total counter\nkiln_model_seconds_total {busy:.6}");
        }
        o
    }
}
