"""Inference: a model file (ONNX with its metadata) -> onnxruntime session -> P(sc).

The ONNX file is the only artefact: the classifier graph plus a JSON metadata entry
(key ``sorting``) holding the feature names and version it was trained on, the
operating threshold, the training-data fingerprint and the cross-validated training
metrics (written by :mod:`sorting.offline.training`). No pickle anywhere. A model whose
features differ from what the pipeline computes is refused at load time (exit status 2
on the command line).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sorting.errors import InputError

META_KEY = "sorting"
MODEL_FORMAT = "sorting-model/1"
INPUT_NAME = "features"


class OnnxModel:
    """A loaded model: onnxruntime session, operating threshold and metadata.

    One intra-op thread and sequential execution: the sorter scores one small batch
    per chunk, where thread hand-off would cost more than the trees.
    """

    def __init__(self, path: Path, session, meta: dict):
        self.path = path
        self.meta = meta
        self.threshold = float(meta["threshold"])
        self.feature_names = tuple(meta["feature_names"])
        self.feature_version = str(meta["feature_version"])
        self.n_features = len(self.feature_names)
        self._session = session
        self._input = session.get_inputs()[0].name
        outs = [o.name for o in session.get_outputs()]
        self._outputs = [outs[-1]]  # probabilities (n, 2); the label output is not needed

    def scores_f32(self, X: np.ndarray) -> np.ndarray:
        """Hot path: P(sc) for a C-contiguous float32 (n, F) array, no conversion or checks.

        Returns a (n,) float32 view into the runtime's output.
        """
        return self._session.run(self._outputs, {self._input: X})[0][:, 1]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """P(sc) in [0, 1], (n,) float32, for features in ``feature_names`` order."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        X = np.where(np.isinf(X), np.float32(np.nan), X)  # the imputer fills NaN, not inf
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"`X` (shape {X.shape}) does not have {self.n_features} feature columns")
        if len(X) == 0:
            return np.zeros(0, np.float32)
        return np.clip(self.scores_f32(X), 0.0, 1.0).astype(np.float32)

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """True where a rock is ``sc`` at the model's operating point."""
        return np.asarray(scores) >= self.threshold


def _pipeline_features() -> tuple[tuple[str, ...], str]:
    from sorting.stages.features import FEATURE_NAMES, FEATURE_VERSION

    return tuple(FEATURE_NAMES), str(FEATURE_VERSION)


def load_model(path: str | Path, *, expected_names: tuple[str, ...] | None = None,
               expected_version: str | None = None) -> OnnxModel:
    """Open and validate a model file written by :meth:`TrainedModel.save`.

    ``expected_names`` / ``expected_version`` default to what the pipeline computes
    (``features.FEATURE_NAMES`` / ``FEATURE_VERSION``).

    Raises
    ------
    InputError
        Missing file, not ONNX, no ``sorting`` metadata, or other features.
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a folder, not a model file (give the .onnx file written by `sorting train`)")
    if not path.is_file():
        raise InputError(path, "no such model file")
    data = path.read_bytes()
    try:
        proto = onnx.load_model_from_string(data)
    except Exception:  # protobuf raises several types on garbage
        raise InputError(path, "not an ONNX model") from None
    if not proto.graph.node or not proto.graph.input:
        raise InputError(path, "not an ONNX model")
    props = {p.key: p.value for p in proto.metadata_props}
    try:
        meta = json.loads(props[META_KEY])
        names, version, thr = meta["feature_names"], meta["feature_version"], float(meta["threshold"])
    except (KeyError, ValueError, TypeError):
        raise InputError(path, "ONNX file without sorting metadata (not written by `sorting train`)") from None
    if expected_names is None or expected_version is None:
        exp_n, exp_v = _pipeline_features()
        expected_names = expected_names if expected_names is not None else exp_n
        expected_version = expected_version if expected_version is not None else exp_v
    if tuple(names) != tuple(expected_names) or str(version) != str(expected_version):
        raise InputError(path, f"model was built on other features (version {version!r}, {len(names)} "
                               f"features; this pipeline computes version {expected_version!r}, "
                               f"{len(expected_names)} features): retrain it with `sorting train`")
    if not 0.0 <= thr <= 1.0:
        raise InputError(path, f"operating threshold {thr} is not in [0, 1]")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InputError(path, f"onnxruntime cannot load the model ({str(exc).splitlines()[0][:200]})") from None
    shape = session.get_inputs()[0].shape
    if len(shape) != 2 or shape[1] != len(names):
        raise InputError(path, f"model input shape {shape} does not match its {len(names)} feature names")
    return OnnxModel(path, session, meta)
