"""GET /metrics: the server's counters, histograms and gauges in Prometheus' text format."""

# A registry of the server's own (not prometheus_client's global one), so that two servers in one process
# (tests) count apart. Time to first token is counted from the moment the request arrived, queueing
# included: it is what a client waits. Per-token latency is a request's generation time over its tokens
# after the first, observed once per request.

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from edgeinfer.serve.worker import Gauges

if TYPE_CHECKING:
    from edgeinfer.engine import GenerationResult

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, gauges: Callable[[], Gauges], cells_total: Callable[[], int]) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("edgeinfer_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("edgeinfer_prompt_tokens", "Prompt tokens of the requests answered",
                                     registry=registry)
        self.generated_tokens = Counter("edgeinfer_generated_tokens", "Tokens generated", registry=registry)
        self.finished = Counter("edgeinfer_answers", "Answers ended, by finish reason (cancelled: the client "
                                "went away or the server stopped)", ["reason"], registry=registry)
        self.ttft = Histogram("edgeinfer_time_to_first_token_seconds", "From the request's arrival to its "
                              "first text", buckets=_TTFT_BUCKETS, registry=registry)
        self.per_token = Histogram("edgeinfer_time_per_output_token_seconds", "A request's generation time "
                                   "over its tokens after the first", buckets=_TOKEN_BUCKETS, registry=registry)
        for name, doc, pick in (("edgeinfer_sequences_active", "Sequences in the context (reading or generating)",
                                 lambda g: g.active),
                                ("edgeinfer_sequences_waiting", "Requests waiting for a place in the context",
                                 lambda g: g.waiting),
                                ("edgeinfer_kv_cells_used", "KV cache positions held, summed over the sequences",
                                 lambda g: g.cells),
                                ("edgeinfer_kv_cells_kept", "KV cache positions kept from finished answers "
                                 "as prefixes for the next request", lambda g: g.kept)):
            Gauge(name, doc, registry=registry).set_function(lambda pick=pick: pick(gauges()))
        Gauge("edgeinfer_kv_cells", "KV cache cells of the context", registry=registry).set_function(cells_total)
        # --draft: a request that generates alone speculates (edgeinfer.batch.Batcher's solo rounds)
        self.drafted = Counter("edgeinfer_speculative_drafted_tokens", "Tokens drafted (or copied out of the "
                               "context) and verified by the model", registry=registry)
        self.accepted = Counter("edgeinfer_speculative_accepted_tokens", "Drafted tokens the model accepted",
                                registry=registry)
        self.rounds = Counter("edgeinfer_speculative_rounds", "Model passes that verified a draft",
                              registry=registry)

    def answered(self, result: GenerationResult) -> None:
        """Count a finished answer's tokens, its finish reason and what speculating did for it."""
        self.prompt_tokens.inc(result.prompt_tokens)
        self.generated_tokens.inc(result.completion_tokens)
        self.finished.labels(result.finish_reason).inc()
        if "drafted" in result.stats:
            self.drafted.inc(result.stats["drafted"])
            self.accepted.inc(result.stats["accepted"])
            self.rounds.inc(result.stats["speculative_passes"])

    def text(self) -> bytes:
        return generate_latest(self.registry)
