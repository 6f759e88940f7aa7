"""Sharded snapshots on 8 to 256 nodes: the arithmetic, and a simulation of the emergency save.

This script owns the figures in docs/scale.md.  It models (it does not run)
runner's multi-node snapshot as it is being built: every rank of a torchrun
job writes one DCP data object `<run>/data/<sid>/__<rank>_0.distcp` and one
`rank-<rank>.pt` (its RNG streams) under the snapshot's fresh prefix; after
one gather, rank 0 writes the sharding plan (JSON) and creates the manifest
exclusively.  For each node count it works out:

- on paper: bytes per node and per rank, objects and S3 requests per snapshot
  (s3fs multipart arithmetic), the request rate the upload offers against
  S3's per-prefix limit, the restore's reads (with DCP resharding), and the
  largest model whose emergency save still fits the spot notice;
- by simulation: the time from a spot notice to the committed manifest over
  `--trials` random trials (notice time, request latencies), with every S3
  write request of the upload simulated as a discrete event against a token
  bucket per prefix partition, 503 SlowDown answers and the nested retries of
  botocore (standard mode), s3fs and runner's storage layer.

Every figure follows from the flags, which name the assumptions; the
defaults are a 7B-parameter model on nodes of 8 GPUs.  It is a model, not a
measurement: nothing here touches a GPU, a store or the network.

    .venv/bin/python benchmarks/scale_sim.py [--params 7e9] [--nodes 8,16,...] [--csv OUT]

Exit codes: 0 done, 1 the CSV could not be written, 2 bad flags.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import math
import sys
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np

GB = 1e9
MiB = 2**20

# Retries as the client stack does them.  botocore's standard mode tries a
# request 3 times, sleeping rand(0,1) * 2**(n-1) s after the n-th attempt;
# s3fs's _error_wrapper repeats that 5 times on SlowDown, sleeping
# min(0.1 * 1.7**i, 15) s after each round (the last one too); when s3fs
# gives up, put_file aborts the multipart upload and runner's Store._call starts
# the whole object again (a new multipart upload), up to 5 times, sleeping
# min(5, 0.2 * 2**a) * U(0.5, 1) s.
BOTO_ATTEMPTS = 3
S3FS_ROUNDS = 5
REQUEST_ATTEMPTS = BOTO_ATTEMPTS * S3FS_ROUNDS
OBJECT_ATTEMPTS = 5

RANK_REPORT_BYTES = 400  # one rank's two file entries (name, size, SHA-256) in the gather
MANIFEST_ENTRY_BYTES = 200  # one file's entry in the manifest JSON


def _assume(default, text: str):
    """A Config field: its default and the help its flag shows."""
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class Config:
    """The assumptions; every field is a flag of the same name (underscores as dashes)."""

    nodes: tuple[int, ...] = _assume((8, 16, 32, 64, 128, 256), "comma-separated node counts (2 or more each)")
    gpus: int = _assume(8, "workers (ranks) per node")
    params: float = _assume(7e9, "model parameters")
    bytes_per_param: float = _assume(14.0, "state bytes per parameter: bf16 weights 2 + fp32 master 4 + Adam moments 8")
    tensors: int = _assume(1164, "state tensors, each sharded over every rank (7B Llama: 291 x 4)")
    plan_entry_bytes: float = _assume(220.0, "JSON bytes per (tensor, rank) chunk of the sharding plan")
    rng_bytes: float = _assume(16e3, "bytes of one rank-<rank>.pt")
    part_mib: float = _assume(16.0, "multipart part size, MiB (objects under 2 parts go as one PUT)")
    concurrency: int = _assume(10, "parts in flight per object (s3fs max_concurrency)")
    node_gbps: float = _assume(2.5, "S3 throughput per node, GB/s, each way")
    conn_gbps: float = _assume(0.1, "S3 throughput of one connection, GB/s")
    bucket_gbps: float = _assume(0.0, "job-wide S3 throughput cap, GB/s (0: none)")
    prefixes: int = _assume(1, "partitioned prefixes the data objects are spread over (1: runner's layout today)")
    put_limit: float = _assume(3500.0, "PUT/COPY/POST/DELETE per second per partitioned prefix")
    get_limit: float = _assume(5500.0, "GET/HEAD per second per partitioned prefix")
    burst_s: float = _assume(0.1, "token-bucket depth of a partition, in seconds of its rate")
    latency_ms: float = _assume(30.0, "median request latency, ms (lognormal)")
    latency_sigma: float = _assume(0.6, "sigma of the lognormal request latency")
    d2h_gbps: float = _assume(20.0, "GPU -> host copy per GPU, GB/s")
    serialize_gbps: float = _assume(1.5, "DCP writing one rank's spool file, GB/s")
    sha_gbps: float = _assume(1.5, "SHA-256 over a spool file, per rank, GB/s")
    spool_gbps: float = _assume(2.0, "local disk the spool files go to, per node, GB/s")
    step_s: float = _assume(3.0, "training step time, s")
    poll_s: float = _assume(2.0, "notice polling interval, s (runner's EC2 default)")
    collective_ms: float = _assume(1.0, "per hop of a gloo collective, ms (log2 of the world size hops)")
    gather_gbps: float = _assume(0.5, "pickled objects through rank 0 in a collective, pickling included, GB/s")
    plan_us: float = _assume(1.0, "DCP planning on rank 0, microseconds per plan entry")
    json_gbps: float = _assume(0.2, "JSON encode/decode of the sharding plan, GB/s")
    notice_s: float = _assume(120.0, "spot notice, s (EC2: two minutes)")
    reserve_s: float = _assume(5.0, "part of the notice runner's supervisor keeps back, s")
    trials: int = _assume(200, "notice times drawn per scenario and node count")
    uploads: int = _assume(5, "uploads simulated per scenario and node count; trial i uses upload i mod uploads")
    seed: int = _assume(0, "random seed (0 or more)")

    @property
    def budget_s(self) -> float:
        return self.notice_s - self.reserve_s

    @property
    def part(self) -> float:
        return self.part_mib * MiB


# -- on paper ---------------------------------------------------------------------------


def put_requests(size: float, part: float) -> int:
    """Write requests s3fs sends for one object: one PutObject under two parts, else create + parts + complete."""
    if size < 2 * part:
        return 1
    return math.ceil(size / part) + 2


def get_requests(size: float, part: float) -> int:
    """GETs runner's store sends to read one object whole (ranged GETs of one part from two parts up), plus one HEAD."""
    return 1 + (1 if size < 2 * part else math.ceil(size / part))


def hops(ranks: int) -> int:
    return max(1, math.ceil(math.log2(ranks)))


@dataclass(frozen=True)
class Plan:
    """What one snapshot of `nodes` nodes holds and costs in requests."""

    nodes: int
    ranks: int
    total_bytes: float
    node_bytes: float
    rank_bytes: float
    plan_bytes: float
    objects: int
    write_requests: int
    parts_per_rank: int


def snapshot_plan(cfg: Config, nodes: int) -> Plan:
    ranks = nodes * cfg.gpus
    total = cfg.params * cfg.bytes_per_param
    # DCP gives every rank an even share: FSDP shards each tensor over all
    # ranks, and a replicated value is written once, by the rank DCP's dedup picks.
    rank_bytes = total / ranks
    plan_bytes = cfg.tensors * ranks * cfg.plan_entry_bytes
    manifest_bytes = 2 * ranks * MANIFEST_ENTRY_BYTES
    requests = (ranks * (put_requests(rank_bytes, cfg.part) + put_requests(cfg.rng_bytes, cfg.part))
                + put_requests(plan_bytes, cfg.part) + put_requests(manifest_bytes, cfg.part))
    parts = 0 if rank_bytes < 2 * cfg.part else math.ceil(rank_bytes / cfg.part)
    return Plan(nodes, ranks, total, total / nodes, rank_bytes, plan_bytes, 2 * ranks + 2, requests, parts)


def node_throughput(cfg: Config, plan: Plan) -> float:
    """Bytes/s one node uploads: its NIC share, or fewer connections than it could fill."""
    streams = max(1, min(cfg.concurrency, plan.parts_per_rank))
    node = min(cfg.node_gbps, cfg.gpus * streams * cfg.conn_gbps) * GB
    if cfg.bucket_gbps:
        node = min(node, cfg.bucket_gbps * GB / plan.nodes)
    return node


def offered_rate(cfg: Config, plan: Plan) -> float:
    """Write requests/s the upload asks of S3 while it runs unthrottled: bandwidth x requests per byte."""
    return plan.nodes * node_throughput(cfg, plan) * plan.write_requests / plan.total_bytes


def collective_s(cfg: Config, ranks: int, nbytes: float) -> float:
    """One gather or broadcast of pickled objects through rank 0 (gloo)."""
    return hops(ranks) * cfg.collective_ms / 1e3 + nbytes / (cfg.gather_gbps * GB)


def plan_s(cfg: Config, plan: Plan, latency: float) -> float:
    """What the sharding plan costs one save: DCP plans on rank 0 and moves the plan three times
    (local plans gathered, write results gathered, the finished plan broadcast to every rank),
    then rank 0 encodes it as JSON and uploads it."""
    planning = cfg.tensors * plan.ranks * cfg.plan_us / 1e6
    moves = 3 * collective_s(cfg, plan.ranks, plan.plan_bytes)
    encode = plan.plan_bytes / (cfg.json_gbps * GB)
    n = put_requests(plan.plan_bytes, cfg.part)
    rounds = 1 if n == 1 else 2 + math.ceil((n - 2) / cfg.concurrency)
    upload = rounds * latency + plan.plan_bytes / (min(cfg.node_gbps, cfg.concurrency * cfg.conn_gbps) * GB)
    return planning + moves + encode + upload


def prepare_s(cfg: Config, plan: Plan) -> float:
    """From the stop vote to a rank's first upload request, the plan's share left out: host copy, spool file, hash."""
    capture = plan.rank_bytes / (cfg.d2h_gbps * GB)
    spool = max(plan.rank_bytes / (cfg.serialize_gbps * GB), plan.node_bytes / (cfg.spool_gbps * GB))
    return capture + spool + plan.rank_bytes / (cfg.sha_gbps * GB)


def commit_s(cfg: Config, plan: Plan, latency: float) -> float:
    """After the last rank's files are in: the file reports gathered, the manifest's exclusive PUT, the outcome broadcast."""
    reports = collective_s(cfg, plan.ranks, plan.ranks * RANK_REPORT_BYTES)
    return reports + latency + collective_s(cfg, plan.ranks, 2 * plan.ranks * MANIFEST_ENTRY_BYTES)


def paper_commit_s(cfg: Config, nodes: int, worst: bool = False) -> float:
    """Notice -> committed manifest from the formulas alone (median latency; `worst`: notice just after a poll and a step start)."""
    plan = snapshot_plan(cfg, nodes)
    latency = cfg.latency_ms / 1e3
    wait = (cfg.poll_s + cfg.step_s) * (1.0 if worst else 0.5)
    vote = hops(plan.ranks) * cfg.collective_ms / 1e3
    per_node = node_throughput(cfg, plan)
    by_bandwidth = plan.node_bytes / per_node
    by_requests = plan.write_requests / (cfg.put_limit * min(cfg.prefixes, plan.ranks))
    rounds = 1 if plan.parts_per_rank == 0 else 2 + math.ceil(plan.parts_per_rank / cfg.concurrency)
    upload = max(by_bandwidth, by_requests) + (rounds + 1) * latency  # + the RNG file's PUT
    return wait + vote + prepare_s(cfg, plan) + upload + plan_s(cfg, plan, latency) + commit_s(cfg, plan, latency)


def largest_model(cfg: Config, nodes: int) -> float:
    """Parameters of the largest model whose worst-case emergency save fits the notice (bisection on paper)."""
    lo, hi = 1e6, 1e14
    if paper_commit_s(replace(cfg, params=lo), nodes, worst=True) > cfg.budget_s:
        return 0.0
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if paper_commit_s(replace(cfg, params=mid), nodes, worst=True) <= cfg.budget_s:
            lo = mid
        else:
            hi = mid
    return lo


# -- restore -----------------------------------------------------------------------------


def objects_touched(old_ranks: int, new_ranks: int) -> np.ndarray:
    """For each new rank, how many old ranks' objects hold part of its shards.

    Every tensor is split evenly by rank (FSDP's dim-0 shards), so new rank r
    needs the old ranks whose slice [j/W, (j+1)/W) meets [r/W', (r+1)/W').
    """
    r = np.arange(new_ranks, dtype=np.int64)
    first = (r * old_ranks) // new_ranks
    last = -(-((r + 1) * old_ranks) // new_ranks)  # ceil
    return last - first


@dataclass(frozen=True)
class Restore:
    new_nodes: int
    amplification_mean: float  # bytes a rank reads / its share of the state
    amplification_max: float
    node_read_bytes: float     # the most-loaded node: its data objects + every rank's copy of the plan
    plan_read_bytes: float     # of which the plan
    gets: int
    gets_hottest: int          # on the busiest partition (the plan's own key at least)
    seconds: float


def restore_estimate(cfg: Config, nodes: int, new_nodes: int) -> Restore:
    """Every rank of the new job: the manifest, the whole plan, then each whole object it needs, hashed before use."""
    plan = snapshot_plan(cfg, nodes)
    new_ranks = new_nodes * cfg.gpus
    touched = objects_touched(plan.ranks, new_ranks)
    share = plan.total_bytes / new_ranks
    amplification = touched * plan.rank_bytes / share
    by_node = touched.reshape(new_nodes, cfg.gpus).sum(axis=1)
    node_data = int(by_node.max()) * plan.rank_bytes
    plan_reads = cfg.gpus * plan.plan_bytes
    rng_gets = get_requests(cfg.rng_bytes, cfg.part) if new_ranks == plan.ranks else 0
    data_gets = int(touched.sum()) * get_requests(plan.rank_bytes, cfg.part)
    plan_gets = new_ranks * get_requests(plan.plan_bytes, cfg.part)
    manifest_gets = new_ranks * get_requests(2 * plan.ranks * MANIFEST_ENTRY_BYTES, cfg.part)
    gets = data_gets + plan_gets + manifest_gets + new_ranks * rng_gets
    # The data and RNG objects spread over the layout's partitions; the plan is one key, so all its GETs
    # land on one of them; the manifest lives under <run>/manifests/, a partition of its own.
    partitions = max(1, min(cfg.prefixes, plan.ranks))
    hottest = max(manifest_gets, math.ceil((data_gets + new_ranks * rng_gets) / partitions) + plan_gets)
    node_bw = min(cfg.node_gbps, cfg.gpus * cfg.concurrency * cfg.conn_gbps) * GB
    if cfg.bucket_gbps:
        node_bw = min(node_bw, cfg.bucket_gbps * GB / new_nodes)
    fetch = max((node_data + plan_reads) / node_bw, hottest / cfg.get_limit)
    rank_read = int(touched.max()) * plan.rank_bytes
    cpu = plan.plan_bytes / (cfg.json_gbps * GB) + (rank_read + plan.plan_bytes) / (cfg.sha_gbps * GB)
    latency = cfg.latency_ms / 1e3
    seconds = fetch + cpu + 4 * latency + 2 * hops(new_ranks) * cfg.collective_ms / 1e3
    return Restore(new_nodes, float(amplification.mean()), float(amplification.max()), node_data + plan_reads,
                   plan_reads, gets, hottest, seconds)


# -- the simulated upload ----------------------------------------------------------------


class _Draws:
    """Random numbers drawn in blocks (one numpy call per 64k draws keeps the event loop fast)."""

    def __init__(self, rng: np.random.Generator, latency_s: float, sigma: float):
        self.rng, self.mu, self.sigma = rng, math.log(latency_s), sigma
        self._lat: list[float] = []
        self._uni: list[float] = []

    def latency(self) -> float:
        if not self._lat:
            self._lat = self.rng.lognormal(self.mu, self.sigma, 65536).tolist()
        return self._lat.pop()

    def uniform(self) -> float:
        if not self._uni:
            self._uni = self.rng.random(65536).tolist()
        return self._uni.pop()


def request_backoff(attempt: int, u: float) -> float:
    """Sleep after failed attempt `attempt` (0-based) of one request: botocore inside, s3fs around it."""
    within = attempt % BOTO_ATTEMPTS
    if within < BOTO_ATTEMPTS - 1:
        return u * 2**within
    return min(0.1 * 1.7 ** (attempt // BOTO_ATTEMPTS), 15.0)


def object_backoff(attempt: int, u: float) -> float:
    """Sleep before runner's storage layer starts an object over after failed attempt `attempt` (0-based)."""
    return min(5.0, 0.2 * 2**attempt) * (0.5 + u / 2)


@dataclass
class UploadResult:
    rank_done: np.ndarray      # seconds from the stop vote until each rank's files are in (inf: failed)
    admitted: int              # write requests S3 accepted
    throttled: int             # 503 SlowDown answers
    restarts: int              # objects started over after a request ran out of retries
    peak_rate: float           # accepted requests in the busiest second of the busiest partition
    peak_offered: float        # attempts (accepted or not) in that partition's busiest second

    @property
    def failed(self) -> bool:
        return bool(np.isinf(self.rank_done).any())


_ARRIVE, _DONE, _START = 0, 1, 2
_PUT, _CREATE, _PART, _COMPLETE = 0, 1, 2, 3


def simulate_upload(cfg: Config, plan: Plan, start: np.ndarray, draws: _Draws) -> UploadResult:
    """Every rank uploads its data object, then its RNG file, from `start[rank]` on; request by request.

    Each request that reaches its partition takes a token (rate `put_limit`,
    depth `burst_s` of it) or gets 503 SlowDown after one latency and is
    retried after the client stack's backoff.  An accepted request lasts one
    latency plus its bytes at the bandwidth it gets when it starts: the
    node's throughput split over the node's transfers in flight, capped per
    connection and by the job-wide `bucket_gbps`.  The parts of one s3fs
    batch arrive together and are one event (each still takes its own token);
    the batch is done when its slowest part is.
    """
    part, conc, gpus = cfg.part, cfg.concurrency, cfg.gpus
    rate_cap, node_bps = cfg.conn_gbps * GB, cfg.node_gbps * GB
    bucket_bps = cfg.bucket_gbps * GB if cfg.bucket_gbps else math.inf
    partitions = max(1, min(cfg.prefixes, plan.ranks))
    refill, depth = cfg.put_limit, max(1.0, cfg.put_limit * cfg.burst_s)
    tokens, last_refill = [depth] * partitions, [0.0] * partitions
    node_active, total_active = [0] * plan.nodes, 0

    # Objects 2r and 2r+1 are rank r's data object and RNG file.
    n_obj = 2 * plan.ranks
    size = [plan.rank_bytes if o % 2 == 0 else cfg.rng_bytes for o in range(n_obj)]
    parts = [0 if s < 2 * part else math.ceil(s / part) for s in size]
    sent, in_flight, gen, tries = [0] * n_obj, [0] * n_obj, [0] * n_obj, [0] * n_obj
    rank_done = np.full(plan.ranks, math.inf)
    accepted_at: list[list[tuple[float, int]]] = [[] for _ in range(partitions)]
    offered_at: list[list[tuple[float, int]]] = [[] for _ in range(partitions)]
    throttled = restarts = 0
    heap: list[tuple] = []
    push, pop, seq = heapq.heappush, heapq.heappop, iter(range(1 << 62))

    def begin(t: float, obj: int) -> None:
        gen[obj] += 1
        sent[obj] = in_flight[obj] = 0
        if parts[obj]:
            push(heap, (t, next(seq), _ARRIVE, obj, _CREATE, 1, 0.0, 0, gen[obj]))
        else:
            push(heap, (t, next(seq), _ARRIVE, obj, _PUT, 1, size[obj], 0, gen[obj]))

    def next_batch(t: float, obj: int) -> None:
        # s3fs reads up to max_concurrency parts and gathers them before the next batch.
        n = min(conc, parts[obj] - sent[obj])
        sent[obj] += n
        in_flight[obj] = n
        nbytes = min(part, size[obj] / parts[obj])  # parts of one size (the short last one is averaged in)
        push(heap, (t, next(seq), _ARRIVE, obj, _PART, n, nbytes, 0, gen[obj]))

    for rank in range(plan.ranks):
        begin(float(start[rank]), 2 * rank)

    while heap:
        t, _, kind, obj, op, count, nbytes, attempt, g = pop(heap)
        node = obj // 2 // gpus
        if g != gen[obj]:
            if kind == _DONE and nbytes:  # an abandoned attempt's transfers still end
                node_active[node] -= count
                total_active -= count
            continue
        if kind == _START:
            begin(t, obj)
        elif kind == _ARRIVE:
            p = (obj // 2) % partitions
            tokens[p] = min(depth, tokens[p] + (t - last_refill[p]) * refill)
            last_refill[p] = t
            offered_at[p].append((t, count))
            ok = min(count, int(tokens[p]))
            if ok:
                tokens[p] -= ok
                accepted_at[p].append((t, ok))
                duration = max(draws.latency() for _ in range(ok))
                if nbytes:
                    node_active[node] += ok
                    total_active += ok
                    duration += nbytes / min(rate_cap, node_bps / node_active[node], bucket_bps / total_active)
                push(heap, (t + duration, next(seq), _DONE, obj, op, ok, nbytes, attempt, g))
            throttled += count - ok
            for _ in range(count - ok):
                if attempt + 1 < REQUEST_ATTEMPTS:
                    retry = t + draws.latency() + request_backoff(attempt, draws.uniform())
                    push(heap, (retry, next(seq), _ARRIVE, obj, op, 1, nbytes, attempt + 1, g))
                    continue
                # s3fs sleeps once more and gives up; put_file aborts the upload and runner's
                # storage layer starts the object over (its retry `tries[obj] - 1`, 0-based).
                tries[obj] += 1
                gen[obj] += 1
                if tries[obj] < OBJECT_ATTEMPTS:  # else this rank's save fails; the others run on
                    restarts += 1
                    again = (t + draws.latency() + request_backoff(attempt, draws.uniform())
                             + object_backoff(tries[obj] - 1, draws.uniform()))
                    push(heap, (again, next(seq), _START, obj, op, 1, 0.0, 0, gen[obj]))
                break
        else:  # _DONE
            if nbytes:
                node_active[node] -= count
                total_active -= count
            if op == _CREATE:
                next_batch(t, obj)
            elif op == _PART:
                in_flight[obj] -= count
                if in_flight[obj] == 0 and sent[obj] < parts[obj]:
                    next_batch(t, obj)
                elif in_flight[obj] == 0:
                    push(heap, (t, next(seq), _ARRIVE, obj, _COMPLETE, 1, 0.0, 0, g))
            elif obj % 2 == 0:
                begin(t, obj + 1)  # the RNG file goes after the shards, as the writer does it
            else:
                rank_done[obj // 2] = t

    admitted = sum(n for a in accepted_at for _, n in a)
    return UploadResult(rank_done, admitted, throttled, restarts,
                        max(_busiest_second(a) for a in accepted_at), max(_busiest_second(a) for a in offered_at))


def _busiest_second(events: list[tuple[float, int]]) -> float:
    """The most requests in any one-second window starting at a request, from (time, count) pairs."""
    if not events:
        return 0.0
    order = sorted(events)
    t = np.array([e[0] for e in order])
    before = np.concatenate([[0], np.cumsum([e[1] for e in order])])
    end = np.searchsorted(t, t + 1.0, side="left")
    return float((before[end] - before[:-1]).max())


# -- one scenario, many trials -----------------------------------------------------------


@dataclass
class Row:
    """One line of the simulation table (and of the CSV); COLUMNS says what each field is."""

    scenario: str
    nodes: int
    ranks: int
    node_gb: float
    rank_mb: float
    plan_mb: float
    objects: int
    write_requests: int
    offered_rps: float
    limit_rps: float
    partitions_needed: int
    prepare_s: float
    upload_p50_s: float
    plan_s: float
    p50_s: float
    p99_s: float
    max_s: float
    paper_s: float
    margin_p99_s: float
    missed: int
    trials: int
    sim_peak_rps: float
    sim_peak_offered_rps: float
    throttled_per_save: float
    restarts_per_save: float
    failed_uploads: int
    uploads: int
    largest_model_b: float
    reshard_amp_mean: float
    reshard_amp_max: float
    restore_node_gb: float
    restore_plan_gb: float
    restore_gets_hottest: int
    restore_minus1_s: float
    restore_same_s: float


COLUMNS = """\
columns (the CSV has one row per scenario and node count, with these fields):
  per snapshot, on paper
    GB/node, MB/rank   node_gb, rank_mb: state bytes each node / rank uploads (the state / nodes, / ranks)
    plan MB            plan_mb: the sharding plan's JSON (tensors x ranks x plan-entry-bytes)
    objects            objects: data objects + RNG files + plan + manifest (2 x ranks + 2)
    PUT+POST           write_requests: s3fs requests for all of them (one PUT under 2 parts, else
                       create + one per part + complete)
    offered/s          offered_rps: write requests/s the upload asks of S3 at full bandwidth, unthrottled
    limit/s            limit_rps: what the layout's partitions accept (put-limit x partitions)
    x limit            offered/s / limit/s; partitions_needed (CSV): partitions that would absorb it
  notice -> committed manifest, simulated (seconds)
    prep               prepare_s: host copy + DCP spool file + SHA-256, before a rank's first request
    upload             upload_p50_s: the last rank's first request -> every rank's files in (median of uploads)
    plan               plan_s: DCP planning, the plan moved 3 times through rank 0, JSON, its upload
    p50, p99, max      p50_s, p99_s, max_s: notice -> manifest over the trials
    paper              paper_s: the same from the formulas alone, median latency, no throttling retries
    margin             margin_p99_s: budget (notice - reserve) - p99; negative: the save does not fit
    missed             missed/trials: trials over the budget
    peak/s, offer/s    sim_peak_rps, sim_peak_offered_rps: accepted / attempted write requests in the
                       busiest 1 s window of the busiest partition (retries included in offer/s)
    503s, restarts     throttled_per_save, restarts_per_save: SlowDown answers, objects started over
                       (failed_uploads of uploads (CSV): uploads where some rank ran out of retries)
    max model          largest_model_b: parameters, billions, of the largest model whose emergency save
                       fits the budget in the worst case (notice just after a poll and a step start)
  restore on N-1 nodes (resharded), on paper
    amp mean, amp max  reshard_amp_mean, reshard_amp_max: bytes a rank reads / its share (the reader
                       fetches whole objects)
    GB/node            restore_node_gb: the busiest node's reads, its data objects + every rank's plan copy
    plan GB            restore_plan_gb: of which the plan
    GETs hot           restore_gets_hottest: GET+HEAD on the busiest partition
    s, same N s        restore_minus1_s, restore_same_s: restore on N-1 nodes / on the same N
"""


def simulate(cfg: Config, name: str, nodes: int, rng: np.random.Generator) -> Row:
    """`cfg.trials` emergency saves on `nodes` nodes, each from a notice at a random moment.

    The upload (thousands of requests) is simulated `cfg.uploads` times; each
    trial draws its own notice timing and commit latencies and takes the
    uploads in turn, which keeps the default run to seconds.
    """
    plan = snapshot_plan(cfg, nodes)
    draws = _Draws(rng, cfg.latency_ms / 1e3, cfg.latency_sigma)
    prepare = prepare_s(cfg, plan)
    results, uploads = [], []
    for _ in range(cfg.uploads):
        start = prepare * rng.lognormal(0.0, 0.05, plan.ranks)  # ranks do not finish their spool files together
        result = simulate_upload(cfg, plan, start, draws)
        results.append(result)
        uploads.append(float(result.rank_done.max() - start.max()))
    # The supervisor polls every poll_s, so it sees the notice up to one interval late; the ranks
    # vote at the next step boundary; then every rank copies, plans, spools and uploads.
    detect = rng.uniform(0, cfg.poll_s, cfg.trials)
    boundary = rng.uniform(0, cfg.step_s, cfg.trials)
    vote = hops(plan.ranks) * cfg.collective_ms / 1e3
    done = np.array([results[i % cfg.uploads].rank_done.max() for i in range(cfg.trials)])
    latencies = rng.lognormal(draws.mu, draws.sigma, cfg.trials)
    tail = np.array([plan_s(cfg, plan, lat) + commit_s(cfg, plan, lat) for lat in latencies])
    t = detect + boundary + vote + done + tail
    # Order statistics, not interpolated: a failed save (inf) stays a failure, and p99 is a time some trial took.
    p50, p99 = (float(np.percentile(t, q, method="higher")) for q in (50, 99))
    same, minus1 = restore_estimate(cfg, nodes, nodes), restore_estimate(cfg, nodes, nodes - 1)
    rate = offered_rate(cfg, plan)
    return Row(
        scenario=name, nodes=nodes, ranks=plan.ranks, node_gb=plan.node_bytes / GB, rank_mb=plan.rank_bytes / 1e6,
        plan_mb=plan.plan_bytes / 1e6, objects=plan.objects, write_requests=plan.write_requests,
        offered_rps=rate, limit_rps=cfg.put_limit * max(1, min(cfg.prefixes, plan.ranks)),
        partitions_needed=math.ceil(rate / cfg.put_limit),
        prepare_s=prepare, upload_p50_s=float(np.median(uploads)), plan_s=plan_s(cfg, plan, cfg.latency_ms / 1e3),
        p50_s=p50, p99_s=p99, max_s=float(t.max()), paper_s=paper_commit_s(cfg, nodes),
        margin_p99_s=cfg.budget_s - p99, missed=int((t > cfg.budget_s).sum()), trials=cfg.trials,
        sim_peak_rps=max(r.peak_rate for r in results), sim_peak_offered_rps=max(r.peak_offered for r in results),
        throttled_per_save=float(np.mean([r.throttled for r in results])),
        restarts_per_save=float(np.mean([r.restarts for r in results])),
        failed_uploads=sum(r.failed for r in results), uploads=cfg.uploads,
        largest_model_b=largest_model(cfg, nodes) / 1e9,
        reshard_amp_mean=minus1.amplification_mean, reshard_amp_max=minus1.amplification_max,
        restore_node_gb=minus1.node_read_bytes / GB, restore_plan_gb=minus1.plan_read_bytes / GB,
        restore_gets_hottest=minus1.gets_hottest, restore_minus1_s=minus1.seconds, restore_same_s=same.seconds,
    )


SCENARIOS = ("base", "spread", "slow-node", "bucket-cap")


def scenarios(cfg: Config, args: argparse.Namespace) -> dict[str, Config]:
    """The base case and the variants the doc compares; `--scenarios` picks among them."""
    every = {
        "base": cfg,
        "spread": replace(cfg, prefixes=args.spread_prefixes),
        "slow-node": replace(cfg, node_gbps=args.slow_node_gbps),
        "bucket-cap": replace(cfg, bucket_gbps=args.bucket_cap_gbps),
    }
    return {name: every[name] for name in args.scenarios}


def run(cfg: Config, variants: dict[str, Config]) -> list[Row]:
    rng = np.random.default_rng(cfg.seed)
    return [simulate(variant, name, n, rng) for name, variant in variants.items() for n in cfg.nodes]


# -- output ------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 1) -> str:
    if not math.isfinite(value):
        return "fail"
    return f"{value:,.{digits}f}"


def render(cfg: Config, rows: list[Row], variants: dict[str, Config]) -> str:
    first = rows[0].scenario
    lines = [
        f"model {cfg.params / 1e9:g}B params x {cfg.bytes_per_param:g} B = {cfg.params * cfg.bytes_per_param / GB:,.0f} GB; "
        f"{cfg.gpus} ranks/node; part {cfg.part_mib:g} MiB; {cfg.node_gbps:g} GB/s per node; "
        f"limit {cfg.put_limit:,.0f} PUT/s, {cfg.get_limit:,.0f} GET/s per partition "
        f"(one partition takes at most {cfg.put_limit * cfg.part / GB:,.1f} GB/s of parts); "
        f"budget {cfg.budget_s:g} s; {cfg.trials} trials, {cfg.uploads} uploads, seed {cfg.seed}",
        "",
        f"Per snapshot (paper; scenario {first})",
        f"{'nodes':>5} {'ranks':>5} {'GB/node':>8} {'MB/rank':>8} {'plan MB':>8} {'objects':>7} "
        f"{'PUT+POST':>8} {'offered/s':>9} {'limit/s':>8} {'x limit':>7}",
    ]
    for r in (r for r in rows if r.scenario == first):
        lines.append(f"{r.nodes:>5} {r.ranks:>5} {r.node_gb:>8.2f} {r.rank_mb:>8.1f} {r.plan_mb:>8.1f} {r.objects:>7,} "
                     f"{r.write_requests:>8,} {r.offered_rps:>9,.0f} {r.limit_rps:>8,.0f} "
                     f"{r.offered_rps / r.limit_rps:>7.1f}")
    lines += ["", f"Notice -> committed manifest (simulated; seconds; budget {cfg.budget_s:g} s)",
              f"{'scenario':<10} {'nodes':>5} {'prep':>5} {'upload':>6} {'plan':>5} {'p50':>6} {'p99':>6} "
              f"{'max':>6} {'paper':>6} {'margin':>7} {'missed':>8} {'peak/s':>7} {'offer/s':>7} {'503s':>7} "
              f"{'restarts':>8} {'max model':>9}"]
    for r in rows:
        lines.append(f"{r.scenario:<10} {r.nodes:>5} {r.prepare_s:>5.1f} {_fmt(r.upload_p50_s):>6} {r.plan_s:>5.1f} "
                     f"{_fmt(r.p50_s):>6} {_fmt(r.p99_s):>6} {_fmt(r.max_s):>6} {_fmt(r.paper_s):>6} "
                     f"{_fmt(r.margin_p99_s):>7} {f'{r.missed}/{r.trials}':>8} {r.sim_peak_rps:>7,.0f} "
                     f"{r.sim_peak_offered_rps:>7,.0f} {r.throttled_per_save:>7,.0f} {r.restarts_per_save:>8.1f} "
                     f"{r.largest_model_b:>8,.0f}B")
    failed = [r for r in rows if r.failed_uploads]
    for r in failed:
        lines.append(f"! {r.scenario} on {r.nodes} nodes: {r.failed_uploads} of {r.uploads} uploads had a rank "
                     "run out of retries (no snapshot)")
    lines += ["", "Restore on N-1 nodes (resharded; paper)",
              f"{'scenario':<10} {'nodes':>5} {'amp mean':>8} {'amp max':>7} {'GB/node':>8} {'plan GB':>8} "
              f"{'GETs hot':>8} {'s':>6} {'same N s':>8}"]
    for r in rows:
        lines.append(f"{r.scenario:<10} {r.nodes:>5} {r.reshard_amp_mean:>8.2f} {r.reshard_amp_max:>7.2f} "
                     f"{r.restore_node_gb:>8.2f} {r.restore_plan_gb:>8.2f} {r.restore_gets_hottest:>8,} "
                     f"{r.restore_minus1_s:>6.1f} {r.restore_same_s:>8.1f}")
    notes = {name: _describe(variant, cfg) for name, variant in variants.items() if variant != cfg}
    if notes:
        lines += [""] + [f"{name}: {text}" for name, text in notes.items()]
    lines += ["", "columns: see --help"]
    return "\n".join(lines)


def _describe(variant: Config, base: Config) -> str:
    a, b = asdict(variant), asdict(base)
    return ", ".join(f"{k.replace('_', '-')} {a[k]:g}" for k in a if a[k] != b[k])


def write_csv(path: str, rows: list[Row]) -> None:
    """One row per scenario and node count, the fields of Row as columns. Raises OSError."""
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=[f.name for f in fields(Row)])
        out.writeheader()
        for r in rows:
            out.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(r).items()})


# -- command line ------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _number(kind: type, low: float = 0.0, strict: bool = True):
    """A flag's type: an int or float above `low` (at least `low` when not `strict`)."""
    def parse(text: str):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if kind is int:
            if not value.is_integer():
                raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
            value = int(value)
        if not math.isfinite(value) or (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f"{text!r} must be {'>' if strict else '>='} {low:g}")
        return value
    return parse


def _node_list(text: str) -> tuple[int, ...]:
    try:
        nodes = tuple(int(n) for n in text.split(",") if n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of node counts") from None
    if not nodes or min(nodes) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: give node counts of 2 or more (restore is modelled on N-1)")
    return nodes


def _scenario_list(text: str) -> tuple[str, ...]:
    names = tuple(n for n in text.split(",") if n)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown scenario {unknown[0] if unknown else text!r}; "
                                         f"choose from {','.join(SCENARIOS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="scale_sim.py", description=__doc__, epilog=COLUMNS,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("assumptions (every scenario starts from these)")
    for f in fields(Config):
        flag, value = "--" + f.name.replace("_", "-"), f.default
        text = f"{f.metadata['help']} (default: {','.join(map(str, value)) if f.name == 'nodes' else f'{value:g}'})"
        if f.name == "nodes":
            kind = _node_list
        elif f.name in ("seed", "bucket_gbps"):
            kind = _number(type(value), strict=False)
        else:
            kind = _number(type(value))
        group.add_argument(flag, type=kind, default=value, help=text, metavar="N")
    parser.add_argument("--scenarios", type=_scenario_list, default=SCENARIOS, metavar="LIST",
                        help=f"which of {','.join(SCENARIOS)} to run (default: all): base = the assumptions; "
                             "spread = the data spread over --spread-prefixes partitions; slow-node = "
                             "--slow-node-gbps per node; bucket-cap = --bucket-cap-gbps for the whole job")
    parser.add_argument("--spread-prefixes", type=_number(int), default=16, metavar="N",
                        help="partitions the 'spread' layout uses (default: 16)")
    parser.add_argument("--slow-node-gbps", type=_number(float), default=0.25, metavar="N",
                        help="per-node S3 throughput of 'slow-node', GB/s (default: 0.25)")
    parser.add_argument("--bucket-cap-gbps", type=_number(float), default=5.0, metavar="N",
                        help="job-wide S3 throughput of 'bucket-cap', GB/s (default: 5)")
    parser.add_argument("--csv", metavar="PATH", help="also write one row per scenario and node count")
    return parser


def config_from(args: argparse.Namespace) -> Config:
    return Config(**{f.name: getattr(args, f.name) for f in fields(Config)})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from(args)
    variants = scenarios(cfg, args)
    rows = run(cfg, variants)
    print(render(cfg, rows, variants))
    if args.csv:
        try:
            write_csv(args.csv, rows)
        except OSError as exc:
            sys.stderr.write(f"scale_sim.py: cannot write {args.csv}: {exc.strerror or exc}\n")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
