"""The serving classifier: ONNX Runtime + ``tokenizers`` only (no torch), with hot reload.

:class:`OnnxClassifier` serves one exported model directory (``model.onnx`` + ``tokenizer.json``;
the format and its one validation live in ``capture.model_dir``). :class:`HotReloadingClassifier`
serves whatever version the serving pointer ``models_dir/current`` names and switches to a new
one in the background when deploy or rollback replaces that file; a version that fails to load
or validate is logged and skipped while the previous one keeps serving. :func:`onnx_session` and
:func:`input_feeds` are how every ONNX Runtime session of the project is built and fed.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from capture.errors import UserError
from capture.fast_path import FastPath
from capture.model_dir import (
    EMBEDDINGS,
    INPUT_NAMES,
    METADATA_FILE,
    MODEL_FILE,
    PROBABILITIES,
    TOKENIZER_FILE,
    ModelDirError,
    ModelMetadata,
    OnnxMetadata,
    read_tokenizer,
)
from capture.pointer_watch import PointerWatch
from capture.pointers import POINTER_FILE, ServingPointer, read_pointer
from capture.types import RUNNERS_UP, Prediction

if TYPE_CHECKING:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from capture.settings import Settings

logger = logging.getLogger(__name__)

SMOKE_TEXT = "schedule time to work on my assignment"
# Texts per ONNX run inside a batch: sorted by length and trimmed to their longest. Small runs
# waste less on padding; one padded run of a whole batch is the slowest (bench/RESULTS.md).
SUB_BATCH = 8
# ONNX Runtime graph rewrites left off when a session is built. SkipLayerNormFusion would turn
# each residual Add + LayerNormalization back into the contrib SkipLayerNormalization op, whose
# CPU kernel is several times slower than the pair it replaces, and a forward pass has one per
# residual (bench/RESULTS.md). The export leaves them unfused.
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
# With threads > 1, a batch's sub-batches run side by side, each on one thread of a second,
# single-threaded session, instead of one after another on the multi-threaded session: more
# texts/s (bench/RESULTS.md). A single prompt still runs on the multi-threaded session
# (intra-op threads cut its latency).


class ModelLoadError(UserError, RuntimeError):
    """A model directory cannot be served; the message names the file and what is wrong."""


def onnx_session(model: str | bytes, *, threads: int = 1) -> ort.InferenceSession:
    """An ONNX Runtime CPU session as serving builds it (sequential, ``threads`` intra-op
    threads, 0 for ONNX Runtime's default of one per core; ``DISABLED_OPTIMIZERS`` off) over a
    file path or a serialised model. Raises what ONNX Runtime raises for a file it cannot load."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(
        model,
        sess_options=options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(DISABLED_OPTIMIZERS),
    )


def input_feeds(tokenizer: Tokenizer, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """The graph's inputs for ``texts``: int64 ``input_ids`` and ``attention_mask``, shape
    ``(len(texts), longest)`` (the tokenizer pads to the longest input)."""
    if len(texts) == 1:  # encode_batch_fast would hand one text to a thread pool: slower
        encodings = [tokenizer.encode(texts[0])]
    else:  # skips the character offsets, which serving never reads
        encodings = tokenizer.encode_batch_fast(list(texts))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }


def _load_error(exc: ModelDirError | OSError, path: Path) -> ModelLoadError:
    """A model-directory format or I/O failure as the classifier's own error (the hot reload
    catches ``ModelLoadError`` and keeps the previous model serving)."""
    if isinstance(exc, ModelDirError):
        return ModelLoadError(str(exc))
    return ModelLoadError(f"{path}: cannot be read ({exc})")


class OnnxClassifier:
    """One exported model directory, loaded once; thread-safe for concurrent predictions."""

    def __init__(
        self,
        model_dir: Path | str,
        *,
        threads: int = 1,
        top_k: int = 1 + RUNNERS_UP,  # the intent and the runners-up the service logs
        sub_batch: int = SUB_BATCH,
        fast_path: bool = False,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads: expected >= 1, found {threads}")
        if sub_batch < 1:
            raise ValueError(f"sub_batch: expected >= 1, found {sub_batch}")
        if top_k < 1:
            raise ValueError(f"top_k: expected >= 1 ranked intents, found {top_k}")
        self.model_dir = Path(model_dir)
        self.threads = threads
        self.top_k = top_k
        self.sub_batch = sub_batch
        self._session = self._load_session(threads)
        self._batch_session = self._session if threads == 1 else self._load_session(1)
        props = self._session.get_modelmeta().custom_metadata_map
        try:
            meta = OnnxMetadata.from_props(props, self.model_dir / MODEL_FILE)
        except ModelDirError as exc:
            raise _load_error(exc, self.model_dir / MODEL_FILE) from exc
        self.version, self.labels = meta.version, meta.labels
        self.oos_label, self.oos_threshold = meta.oos_label, meta.oos_threshold
        self.quantization = meta.quantization
        self.embedding_dim = self._check_graph()
        self._check_model_metadata()
        self._tokenizer = self._load_tokenizer()
        self._smoke_test()
        # The cascade (capture.fast_path): None when off or when the directory has none.
        self.fast_path = self._load_fast_path(meta) if fast_path else None

    def __repr__(self) -> str:
        return (
            f"OnnxClassifier({str(self.model_dir)!r}, version={self.version!r}, "
            f"labels={len(self.labels)}, quantization={self.quantization!r})"
        )

    # Loading and validation.

    def _load_session(self, threads: int) -> ort.InferenceSession:
        path = self.model_dir / MODEL_FILE
        if not self.model_dir.is_dir():
            raise ModelLoadError(f"{self.model_dir}: model directory not found")
        if not path.is_file():
            raise ModelLoadError(
                f"{path}: missing; export the model first (tasks.export_onnx.export_onnx)"
            )
        try:
            return onnx_session(str(path), threads=threads)
        except Exception as exc:  # onnxruntime raises several pybind types; re-raised with the path
            raise ModelLoadError(
                f"{path}: ONNX Runtime cannot load it ({type(exc).__name__}: {exc}); the file "
                "is corrupt or truncated: re-export or redeploy the model"
            ) from exc

    def _check_graph(self) -> int:
        path = self.model_dir / MODEL_FILE
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        if set(inputs) != set(INPUT_NAMES):
            raise ModelLoadError(
                f"{path}: expected inputs {list(INPUT_NAMES)}, found {sorted(inputs)}"
            )
        for name in INPUT_NAMES:
            if inputs[name].type != "tensor(int64)":
                raise ModelLoadError(
                    f"{path}: input {name} expected tensor(int64), found {inputs[name].type}"
                )
        missing = {PROBABILITIES, EMBEDDINGS} - set(outputs)
        if missing:
            raise ModelLoadError(
                f"{path}: expected outputs {PROBABILITIES!r} and {EMBEDDINGS!r}, found "
                f"{sorted(outputs)}"
            )
        width = outputs[PROBABILITIES].shape[-1]
        if width != len(self.labels):
            raise ModelLoadError(
                f"{path}: output {PROBABILITIES!r} has width {width} but the metadata lists "
                f"{len(self.labels)} labels; the file and its label list do not belong together"
            )
        dim = outputs[EMBEDDINGS].shape[-1]
        return dim if isinstance(dim, int) else -1

    def _check_model_metadata(self) -> None:
        """The model metadata (``ModelMetadata``), when the directory has it, must be valid and
        describe the same
        model as ``model.onnx`` (serving itself reads only the ONNX metadata)."""
        path = self.model_dir / METADATA_FILE
        if not path.exists():
            return
        try:
            meta = ModelMetadata.read(self.model_dir)
        except ModelDirError as exc:
            raise _load_error(exc, path) from exc
        mixed = "the directory mixes two models: re-export it"
        if meta.version != self.version:
            raise ModelLoadError(
                f"{path}: version {meta.version!r} differs from {self.version!r} in "
                f"{MODEL_FILE}; {mixed}"
            )
        if meta.labels != self.labels:
            raise ModelLoadError(
                f"{path}: labels ({len(meta.labels)}) differ from the {len(self.labels)} in "
                f"{MODEL_FILE}; {mixed}"
            )

    def _load_tokenizer(self) -> Tokenizer:
        path = self.model_dir / TOKENIZER_FILE
        try:
            tokenizer = read_tokenizer(self.model_dir, fix_missing="export the model first")
        except ModelDirError as exc:
            raise _load_error(exc, path) from exc
        padding = tokenizer.padding
        if padding is None:
            raise ModelLoadError(f"{path}: padding is not configured; re-export the model")
        if padding.get("length") is not None:
            raise ModelLoadError(
                f"{path}: pads every input to {padding['length']} tokens; serving expects "
                "padding to the longest input: re-export the model"
            )
        if tokenizer.truncation is None:
            raise ModelLoadError(f"{path}: truncation is not configured; re-export the model")
        return tokenizer

    def _load_fast_path(self, meta: OnnxMetadata) -> FastPath | None:
        """The directory's fast path, checked against ``model.onnx``'s metadata (None without
        one); a malformed one or one fitted to another model is a ``ModelLoadError``."""
        path = self.model_dir / METADATA_FILE
        if not path.exists():
            return None
        try:
            fast = FastPath.load(self.model_dir, meta, top_k=self.top_k)
        except (ModelDirError, OSError) as exc:
            raise _load_error(exc, path) from exc
        if fast is not None:
            logger.info("%s: fast path %r in front of %s", self.model_dir, fast, MODEL_FILE)
        return fast

    def _smoke_test(self) -> None:
        path = self.model_dir / MODEL_FILE
        try:
            probabilities, embeddings = self._run([SMOKE_TEXT, ""], (PROBABILITIES, EMBEDDINGS))
        except Exception as exc:  # any run-time failure of the graph means it cannot serve
            raise ModelLoadError(
                f"{path}: smoke prediction failed ({type(exc).__name__}: {exc}); re-export it"
            ) from exc
        if probabilities.shape != (2, len(self.labels)) or not np.all(np.isfinite(probabilities)):
            raise ModelLoadError(
                f"{path}: smoke prediction gave probabilities of shape {probabilities.shape} "
                f"(expected (2, {len(self.labels)}), finite)"
            )
        sums = probabilities.sum(axis=1)
        if not np.allclose(sums, 1.0, atol=1e-3):
            raise ModelLoadError(
                f"{path}: smoke prediction probabilities sum to {sums.tolist()}, expected 1"
            )
        norms = np.linalg.norm(embeddings, axis=1)
        if not np.allclose(norms, 1.0, atol=1e-3):
            raise ModelLoadError(
                f"{path}: smoke embeddings have norms {norms.tolist()}, expected 1 (L2-normalised)"
            )

    # Inference.

    def _encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}]: expected str, found {type(text).__name__}")
        return input_feeds(self._tokenizer, texts)

    def _run(self, texts: Sequence[str], outputs: Sequence[str]) -> list[np.ndarray]:
        """Run the graph; batches larger than ``sub_batch`` go in length-sorted sub-batches,
        each trimmed to its own longest input (less padding), results in input order. With
        ``threads`` > 1 the sub-batches run side by side (see ``_batch_pool``)."""
        names = list(outputs)
        feeds = self._encode(texts)
        if len(texts) <= self.sub_batch:
            return list(self._session.run(names, feeds))
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        lengths = mask.sum(axis=1)
        order = np.argsort(lengths, kind="stable")
        chunks = [
            order[start : start + self.sub_batch] for start in range(0, len(texts), self.sub_batch)
        ]

        def run_chunk(rows: np.ndarray) -> list[np.ndarray]:
            width = int(lengths[rows].max())
            chunk = {"input_ids": ids[rows, :width], "attention_mask": mask[rows, :width]}
            return list(self._batch_session.run(names, chunk))

        chunk_results: Iterator[list[np.ndarray]] = (
            map(run_chunk, chunks)
            if self.threads == 1
            else _batch_pool(self.threads).map(run_chunk, chunks)
        )
        results: list[np.ndarray] = []
        for rows, values in zip(chunks, chunk_results, strict=True):
            if not results:
                results = [np.empty((len(texts), *v.shape[1:]), dtype=v.dtype) for v in values]
            for result, value in zip(results, values, strict=True):
                result[rows] = value
        return results

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Calibrated probabilities, shape ``(len(texts), len(labels))``, columns in label order."""
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return self._run(texts, (PROBABILITIES,))[0]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised sentence embeddings, shape ``(len(texts), dim)``."""
        if not texts:
            return np.zeros((0, max(self.embedding_dim, 0)), dtype=np.float32)
        return self._run(texts, (EMBEDDINGS,))[0]

    def predict(self, text: str) -> Prediction:
        if self.fast_path is not None:  # the cascade: a confident fast answer, else the model
            answer = self.fast_path.predict(text)
            if answer is not None:
                return answer
        return self._to_prediction(self.predict_proba([text])[0])

    def predict_batch(self, texts: Sequence[str]) -> list[Prediction]:
        if self.fast_path is None:
            return [self._to_prediction(row) for row in self.predict_proba(texts)]
        answers = self.fast_path.predict_batch(texts)
        rest = [i for i, answer in enumerate(answers) if answer is None]
        if rest:
            for i, row in zip(rest, self.predict_proba([texts[i] for i in rest]), strict=True):
                answers[i] = self._to_prediction(row)
        return [answer for answer in answers if answer is not None]

    def _to_prediction(self, row: np.ndarray) -> Prediction:
        """The top intent and ``top_k - 1`` runners-up (``top_k`` ranked intents in all).

        Below ``oos_threshold`` the intent is ``oos_label``, its confidence the top probability,
        and the runners-up start with the best in-scope label.
        """
        # Plain Python on one tolist(): right after a forward pass the caches are cold and each
        # small numpy call is slow (argpartition + argsort took longer than this sort).
        # The sort is stable, so ties keep label order.
        values = row.tolist()
        ranked = sorted(range(len(values)), key=values.__getitem__, reverse=True)[: self.top_k]
        runners = [(self.labels[i], _probability(values[i])) for i in ranked]
        best = ranked[0]
        confidence = runners[0][1]
        if self.oos_threshold is not None and confidence < self.oos_threshold:
            return Prediction(self.oos_label, confidence, tuple(runners[: self.top_k - 1]))
        return Prediction(self.labels[best], confidence, tuple(runners[1 : self.top_k]))


def _batch_pool(workers: int) -> ThreadPoolExecutor:
    """The process's worker threads for sub-batches, one pool per thread count and process,
    made on first use and shared by every classifier (a hot reload does not add threads);
    ``workers`` bounds how many sub-batches run at once across all concurrent batch calls."""
    # Keyed by process id too: a child forked after the pool was made (a pre-forking server)
    # inherits a pool whose threads do not exist in it and would wait on them forever.
    return _pool_for(workers, os.getpid())


@functools.cache
def _pool_for(workers: int, pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"onnx-batch-{pid}")


def _probability(value: float) -> float:
    return min(1.0, max(0.0, float(value)))


# Hot reload.

_STATS = ("version", "reloads", "failed_reloads", "last_error")


class HotReloadingClassifier(PointerWatch):
    """Serves the version named by ``models_dir/current``; reloads in the background on change.

    Requests take the current :class:`OnnxClassifier` reference once, so a swap happens between
    requests and an in-flight request finishes on the model it started with. A version that
    fails to load keeps the old one serving and is not retried until ``current`` changes again.
    """

    def __init__(
        self,
        models_dir: Path | str,
        *,
        threads: int = 1,
        top_k: int = 1 + RUNNERS_UP,
        interval_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
        watch: bool = True,
        fast_path: bool = False,
    ) -> None:
        super().__init__(models_dir, interval_s=interval_s, clock=clock, sleep=sleep)
        self.threads = threads
        self.top_k = top_k
        self.fast_path = fast_path  # serve each version's fast path when it has one
        self._check_lock = threading.Lock()
        self.reloads = 0
        self.failed_reloads = 0
        self.last_error: str | None = None
        self.last_check_at: float | None = None
        self.loaded_at: float | None = None
        self._failed_pointer: ServingPointer | None = None

        pointer = self._read_pointer()
        self._classifier = self._load(pointer.version)
        self._seen = pointer
        self.loaded_at = clock()
        logger.info("serving model %s from %s", self._classifier.version, self.models_dir)
        if watch:
            self._start_watch("model-hot-reload")

    # The prediction API, delegated to the model in service at call time.

    @property
    def classifier(self) -> OnnxClassifier:
        return self._classifier

    @property
    def version(self) -> str:
        return self._classifier.version

    @property
    def labels(self) -> tuple[str, ...]:
        return self._classifier.labels

    @property
    def oos_label(self) -> str:
        return self._classifier.oos_label

    @property
    def oos_threshold(self) -> float | None:
        return self._classifier.oos_threshold

    def predict(self, text: str) -> Prediction:
        return self._classifier.predict(text)

    def predict_batch(self, texts: Sequence[str]) -> list[Prediction]:
        return self._classifier.predict_batch(texts)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return self._classifier.predict_proba(texts)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self._classifier.embed(texts)

    def stats(self) -> dict[str, Any]:
        """The attributes ``version``, ``reloads``, ``failed_reloads`` and ``last_error``."""
        return {key: getattr(self, key) for key in _STATS}

    # Watching ``current``.

    def _read_pointer(self) -> ServingPointer:
        path = self.models_dir / POINTER_FILE
        try:
            pointer = read_pointer(self.models_dir)
        except (ModelDirError, OSError) as exc:
            raise _load_error(exc, path) from exc
        if pointer is None:
            raise ModelLoadError(
                f"{path}: missing; deploy a model first (it names the serving version)"
            )
        return pointer

    def _load(self, version: str) -> OnnxClassifier:
        return OnnxClassifier(
            self.models_dir / version,
            threads=self.threads,
            top_k=self.top_k,
            fast_path=self.fast_path,
        )

    def reload_now(self) -> bool:
        """Check ``current`` once, synchronously; True when a new model was swapped in."""
        with self._check_lock:
            self.last_check_at = self._clock()
            try:
                pointer = self._read_pointer()
            except ModelLoadError as exc:
                self._record_failure(None, str(exc))
                return False
            if pointer in (self._seen, self._failed_pointer):
                return False
            if pointer.version == self._seen.version:
                self._seen = pointer  # rewritten with the version in service: nothing to load
                self._failed_pointer = None
                return False
            try:
                candidate = self._load(pointer.version)
            except ModelLoadError as exc:
                self._record_failure(pointer, str(exc))
                return False
            if candidate.version != pointer.version:
                logger.warning(
                    "%s names %s whose model.onnx says version %s; serving it anyway",
                    self.models_dir / POINTER_FILE,
                    pointer.version,
                    candidate.version,
                )
            previous = self._classifier.version
            self._classifier = candidate  # one reference assignment: atomic for readers
            self._seen = pointer
            self._failed_pointer = None
            self.last_error = None
            self.reloads += 1
            self.loaded_at = self._clock()
            logger.info("hot reload: %s -> %s", previous, candidate.version)
            return True

    def _record_failure(self, pointer: ServingPointer | None, message: str) -> None:
        if pointer is not None:
            self._failed_pointer = pointer
        if message != self.last_error:
            self.failed_reloads += 1
            self.last_error = message
            logger.error("hot reload refused, still serving %s: %s", self.version, message)

    def _check_failed(self) -> None:
        self.failed_reloads += 1
        logger.exception("hot reload check failed; still serving %s", self.version)


def load_serving_classifier(
    settings: Settings | None = None, *, watch: bool = True
) -> HotReloadingClassifier:
    """The hot-reloading classifier over ``settings.models_dir``, configured by ``settings``."""
    from capture.settings import get_settings

    settings = settings or get_settings()
    return HotReloadingClassifier(
        settings.models_dir,
        threads=settings.onnx_threads,
        interval_s=settings.reload_interval_s,
        watch=watch,
        fast_path=settings.fast_path,
    )
