"""Many models at once: which registered generators claim an image (``flipad attribute``).

A platform screening uploads against many generators asks, per image, which models' detectors
accept it: model G *claims* x when its split-conformal p-value is at least α, p_G(x) ≥ α
(:func:`flipad_jax.metrics.p_values`; rejecting at p < α has false-negative rate ≤ α for G's own
samples). The answer is open-world: no model, one, or several may claim an image.

Registry (a folder; :func:`add_entry` / ``flipad registry add`` build one)::

    DIR/<name>/detector/   a detector folder written by ``flipad fit``
    DIR/<name>/bundle/     the head bundle it was fitted with (``flipad convert``); FLIPAD only,
                           and optional when the detector carries its head (``detector/head/``)

``<name>`` names the model in every output. :meth:`Registry.load` refuses a FLIPAD detector
whose bundle is missing or is not its head (by the head fingerprint the detector saved), two
entries whose bundles are the same files (the same bundle sha256: one generator, two
detectors), detectors that decode 8-bit pixels to different ranges or take images of different
shapes (a FLIPAD detector fitted on precomputed features, as the demo's, takes its head's
output shape; other such detectors are refused), and SM-Inv₂ detectors.

Stacked inversion. FLIPAD heads of one geometry (same operator structure, shapes and dtypes)
whose solver settings share the compiled parts (stop rule, restart, invert batch size) are
inverted together: :func:`invert_stacked` runs one compiled FISTA loop ``jax.vmap``-ed over
the model axis of their stacked operator leaves; λ, step, tolerance, max_iter and start stay
per model. Per-sample freezing makes each model's result what its own solve gives (to float
rounding: the batched convolution sums in another order; a certified stop that falls within
that rounding of its bound may then come one iteration apart). JAX's vmap of a convolution
whose kernel is batched is a grouped convolution, which XLA:CPU runs 7–18× slower than the
ungrouped ones a loop runs; the stacked operators therefore convolve with
``kernel_batching="block_diagonal"`` (one dense convolution over the models' stacked channels,
the same products). Even so, on the 2-core CPU the stacked solve measured 0.75–1.21× the
loop's speed on the demo's four same-geometry heads (``benchmarks/attribute.py``): the
solver's elementwise work dominates an iteration and stacking does not reduce it. Stacking is
therefore off by default on the CPU backend and on elsewhere (``stack=None``), where it has not
been measured yet.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from flipad_jax._checks import check_int, check_positive
from flipad_jax._files import atomic_dir, check_new_path
from flipad_jax._partial import CsvRows, JsonlRows, PartialOutput
from flipad_jax.evidence import pixel_range
from flipad_jax.features import check_solved, downsample
from flipad_jax.lasso import LassoOptions, _fista
from flipad_jax.metrics import p_values
from flipad_jax.operators import Conv2d, ConvTranspose2d
from flipad_jax.sharding import device_batches

DEFAULT_ALPHA = 0.005  # the paper's fnr: G claims x unless p_G(x) < 0.005
DETECTOR_DIR, BUNDLE_DIR = "detector", "bundle"


def check_alpha(alpha) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha!r}: expected a level in (0, 1), e.g. 0.005")
    return alpha


# -- the registry ---------------------------------------------------------------------------------

class Entry(NamedTuple):
    """One registered model: its name, loaded detector, folders and their sha256 digests
    (:func:`flipad_jax.scoring.detector_digest`; bundle fields None without a bundle)."""

    name: str
    detector: object
    detector_path: Path
    detector_sha256: str
    bundle_path: Optional[Path]
    bundle_sha256: Optional[str]


def _load_entry(folder: Path) -> Entry:
    from flipad_jax.detector import Detector
    from flipad_jax.detector_io import HeadMismatchError, embedded_bundle, read_meta
    from flipad_jax.head import Head
    from flipad_jax.scoring import detector_digest
    from flipad_jax.sminv import SMInv2

    det_path, bundle_path = folder / DETECTOR_DIR, folder / BUNDLE_DIR
    if not det_path.is_dir():
        raise ValueError(f"registry entry {folder}: no {DETECTOR_DIR}/ folder: expected "
                         f"{folder}/{DETECTOR_DIR} written by `flipad fit`")
    if SMInv2.is_saved(det_path):
        raise ValueError(f"{det_path}: an SM-Inv₂ detector: expected FLIPAD, RawPAD, DCTPAD or "
                         "SM-F detectors in a registry")
    fitted_head = read_meta(det_path)["head"]
    if not bundle_path.is_dir() and embedded_bundle(det_path) is not None:
        bundle_path = embedded_bundle(det_path)  # the detector carries its head
    has_bundle = bundle_path.is_dir()
    if fitted_head is not None and not has_bundle:
        raise ValueError(f"{det_path}: a FLIPAD detector whose bundle is missing: expected its "
                         f"head bundle at {bundle_path} (or carried in the detector folder)")
    if fitted_head is None and has_bundle:
        raise ValueError(f"{bundle_path}: the detector {det_path} uses no head: expected no "
                         f"{BUNDLE_DIR}/ beside a {DETECTOR_DIR}/ fitted without one")
    head = Head.load(bundle_path) if has_bundle else None
    try:
        detector = Detector.load(det_path, head=head, progress=False)
    except HeadMismatchError as error:
        raise ValueError(f"{bundle_path} is not the bundle of {det_path}: {error}") from None
    if detector.image_shape_ is None:
        raise ValueError(f"{det_path}: fitted on precomputed features without a head, so the "
                         "images it takes are unknown: expected a detector fitted on images "
                         "(flipad fit) or a FLIPAD one")
    return Entry(folder.name, detector, det_path, detector_digest(det_path),
                 bundle_path if has_bundle else None,
                 detector_digest(bundle_path) if has_bundle else None)


def _entry_folders(path: Path) -> list:
    return sorted(f for f in path.iterdir() if f.is_dir() and not f.name.startswith("."))


def _entries(path: Path, folders: Mapping[str, Path]) -> tuple:
    """The entries ``{name: folder}`` of the registry ``path``, loaded and checked together
    (module docstring), sorted by name."""
    entries = tuple(_load_entry(folders[name])._replace(name=name) for name in sorted(folders))
    by_bundle: dict = {}
    for e in entries:
        if e.bundle_sha256 is None:
            continue
        if e.bundle_sha256 in by_bundle:
            raise ValueError(f"registry {path}: two detectors for one bundle (sha256 "
                             f"{e.bundle_sha256[:12]}…): {by_bundle[e.bundle_sha256]} and "
                             f"{e.name}: expected one detector per generator")
        by_bundle[e.bundle_sha256] = e.name
    for what, of in (("decode 8-bit pixels to", pixel_range),
                     ("take images of shape", lambda d: d.image_shape_)):
        values = {e.name: of(e.detector) for e in entries}
        if len(set(values.values())) > 1:
            raise ValueError(f"registry {path}: detectors {what} different values {values}: "
                             "expected one for all entries")
    return entries


class Registry(NamedTuple):
    """A loaded registry folder (module docstring): entries sorted by name."""

    path: Path
    entries: tuple

    @classmethod
    def load(cls, path) -> "Registry":
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"registry {path}: not a folder: expected a registry folder "
                             "(flipad registry add)")
        entries = _entries(path, {f.name: f for f in _entry_folders(path)})
        if not entries:
            raise ValueError(f"registry {path}: no entries: expected folders "
                             f"<name>/{DETECTOR_DIR} (and <name>/{BUNDLE_DIR})")
        return cls(path, entries)

    @property
    def names(self) -> list:
        return [e.name for e in self.entries]

    @property
    def detectors(self) -> list:
        return [e.detector for e in self.entries]

    @property
    def output_range(self):
        return pixel_range(self.entries[0].detector)

    @property
    def image_shape(self) -> tuple:
        return self.entries[0].detector.image_shape_


def add_entry(registry, name: str, *, detector, bundle=None, overwrite: bool = False) -> Path:
    """Copy a detector folder (and its head bundle) into ``registry/name``, atomically.

    The entry is staged in a hidden folder of the registry and the registry is checked with it
    as :meth:`Registry.load` checks (its bundle is the detector's head; no other entry holds the
    same bundle; one pixel range and image shape) before it is moved in, so a refusal leaves
    the registry as it was. With ``overwrite`` an existing entry ``name`` is replaced. Returns
    the entry's folder.
    """
    if not name or name.startswith(".") or "/" in name:
        raise ValueError(f"name={name!r}: expected a folder name (no '/', not hidden)")
    registry = Path(registry)
    target = check_new_path(registry / name, overwrite=overwrite)
    with atomic_dir(target, overwrite=overwrite) as tmp:
        shutil.copytree(detector, tmp / DETECTOR_DIR)
        if bundle is not None:
            shutil.copytree(bundle, tmp / BUNDLE_DIR)
        folders = {f.name: f for f in _entry_folders(registry)}
        _entries(registry, {**folders, name: tmp})
    return target


# -- stacked inversion -----------------------------------------------------------------------------

class StackedInversion(NamedTuple):
    """``z`` ``(M, B, *in_shape)`` per model and image; ``iterations``, ``status`` ``(M, B)``."""

    z: np.ndarray
    iterations: np.ndarray
    status: np.ndarray


@functools.partial(jax.jit, static_argnames=("treedef", "restart", "stop", "continuation",
                                             "step_growth"))
def _solve_stacked(leaves, o, anchor, lam, reference_start, step, tol, max_iter, *, treedef,
                   restart, stop, continuation, step_growth):
    def one(leaves, o, anchor, lam, reference_start, step, tol, max_iter):
        # solve_lasso's substitution δ = z − z̄, r = o − b − A z̄, per model
        op = jax.tree_util.tree_unflatten(treedef, leaves)
        anchor = anchor[None]
        r = op.out_to_internal(o - op.affine(anchor))
        delta0 = jnp.broadcast_to(jnp.where(reference_start, anchor, 0), (o.shape[0],) +
                                  anchor.shape[1:])  # δ₀ = z̄ (z₀ = 2z̄) or 0
        delta, iterations, *_, status = _fista(
            op, r, jnp.broadcast_to(lam, o.shape[:1]), op.to_internal(delta0), step, tol,
            max_iter, restart=restart, stop=stop, continuation=continuation,
            step_growth=step_growth)
        return op.from_internal(delta) + anchor, iterations, status

    return jax.vmap(one)(leaves, o, anchor, lam, reference_start, step, tol, max_iter)


def _block_diagonal_when_stacked(op):
    """A convolution whose vmap over the model axis runs one dense block-diagonal convolution
    instead of a grouped one (:class:`~flipad_jax.operators.Conv2d`'s ``kernel_batching``)."""
    if isinstance(op, (Conv2d, ConvTranspose2d)):
        return dataclasses.replace(op, kernel_batching="block_diagonal")
    return op


def geometry_key(head, options: LassoOptions, batch_size: int = 0) -> tuple:
    """Heads (with solver settings) of equal keys can be inverted by one stacked solve."""
    leaves, treedef = jax.tree_util.tree_flatten(head.op)
    return (treedef, tuple((leaf.shape, leaf.dtype.str) for leaf in leaves),
            options.stop, options.restart, options.continuation, options.step_growth, batch_size)


def invert_stacked(heads: Sequence, x, lams: Sequence[float],
                   options: Sequence[LassoOptions]) -> StackedInversion:
    """FLIPAD inversion of one batch of images under M heads of one geometry, as one solve.

    Per model m it is ``heads[m].invert(x, lams[m], options=options[m])``: ½‖A_m z + b_m −
    σ_m⁻¹(x)‖² + λ_m‖z − z̄_m‖₁ per image, by FISTA with model m's step, tolerance, max_iter
    and start; the loop is vmapped over the model axis (module docstring).

    Args:
      heads: M :class:`~flipad_jax.Head` with equal :func:`geometry_key` (stop rule and restart
        of ``options`` included).
      x: ``(B, *out_shape)`` images in the heads' output range.
      lams, options: λ and :class:`~flipad_jax.LassoOptions` per head.
    """
    keys = {geometry_key(h, o) for h, o in zip(heads, options)}
    if len(heads) == 0 or len(keys) != 1 or not len(heads) == len(lams) == len(options):
        raise ValueError(f"heads: {len(heads)} heads with {len(keys)} geometries, {len(lams)} "
                         f"lams and {len(options)} options: expected M >= 1 heads of one "
                         "geometry and solver variant, one lam and options each")
    o = jnp.stack([h.target(x) for h in heads])
    steps = []
    for h, opts in zip(heads, options):
        if opts.step is not None:
            steps.append(opts.step)
        else:
            lipschitz = check_positive("lipschitz", h.lipschitz or h.op.lipschitz())
            steps.append(1.0 / (opts.lipschitz_margin * lipschitz))
    dtype = o.dtype
    ops = [_block_diagonal_when_stacked(h.op) for h in heads]
    treedef = jax.tree_util.tree_structure(ops[0])
    leaves = [jnp.stack(ls) for ls in zip(*(jax.tree_util.tree_leaves(op) for op in ops))]
    lam = jnp.asarray([check_positive("lam", v, allow_zero=True) for v in lams], dtype)
    z, iterations, status = _solve_stacked(
        leaves, o, jnp.stack([h.zbar for h in heads]), lam,
        jnp.asarray([opts.start == "reference" for opts in options]),
        jnp.asarray(steps, dtype), jnp.asarray([opts.tol_for(h.op, dtype) for h, opts in
                                                zip(heads, options)], dtype),
        jnp.asarray([opts.max_iter for opts in options], jnp.int32),
        treedef=treedef, restart=options[0].restart, stop=options[0].stop,
        continuation=options[0].continuation, step_growth=options[0].step_growth)
    return StackedInversion(np.asarray(z), np.asarray(iterations), np.asarray(status))


# -- scores of many detectors ----------------------------------------------------------------------

def _stacked_features(detectors: Sequence, x) -> list:
    """Unstandardised FLIPAD features ``detector.features(x)`` of FLIPAD detectors that share a
    :func:`geometry_key`, by :func:`invert_stacked` over the same batches as
    :meth:`~flipad_jax.Head.invert_batches` (``invert_batch_size``, padded alike)."""
    configs = [d.feature_config for d in detectors]
    parts = []
    for xb, size in device_batches(x, configs[0].invert_batch_size):
        res = invert_stacked([d.head for d in detectors], xb, [c.lam for c in configs],
                             [c.lasso for c in configs])
        parts.append((res.z[:, :size], res.status[:, :size]))
    z, status = (np.concatenate(a, axis=1) for a in zip(*parts))
    for status_m in status:
        check_solved(status_m)
    return [np.array(downsample(z_m, c.pool_to, c.downsample), np.float32)
            for c, z_m in zip(configs, z)]


def default_stack() -> bool:
    """Stack where it pays: not on the CPU backend (module docstring)."""
    return jax.default_backend() != "cpu"


def scores_many(detectors: Sequence, x, *, stack: Optional[bool] = None) -> np.ndarray:
    """Anomaly scores ``(M, B)`` float32 of images ``x`` ``(B, C, H, W)`` under M detectors:
    row m is ``detectors[m].anomaly_score(x)``. With ``stack`` (default :func:`default_stack`)
    FLIPAD detectors of one geometry share a stacked inversion; the others are scored one by
    one."""
    stack = default_stack() if stack is None else stack
    for d in detectors:
        if d.image_shape_ not in (None, tuple(np.shape(x)[1:])):
            raise ValueError(f"x has per-sample shape {tuple(np.shape(x)[1:])}: expected "
                             f"{d.image_shape_}, the image shape of every detector")
    scores: list = [None] * len(detectors)
    groups: dict = {}
    for m, d in enumerate(detectors):
        fc = d.feature_config
        if stack and fc.kind == "flipad":
            groups.setdefault(geometry_key(d.head, fc.lasso, fc.invert_batch_size), []).append(m)
        else:
            scores[m] = d.anomaly_score(x)
    for members in groups.values():
        if len(members) == 1:
            scores[members[0]] = detectors[members[0]].anomaly_score(x)
            continue
        for m, f in zip(members, _stacked_features([detectors[m] for m in members], x)):
            scores[m] = detectors[m].anomaly_score(f, precomputed=True)
    return np.stack([np.asarray(s, np.float32) for s in scores])


def claims(p, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Which models claim each image: ``p ≥ alpha`` elementwise (``(M, B)`` p-values)."""
    return np.asarray(p) >= check_alpha(alpha)


# -- rows ------------------------------------------------------------------------------------------

class _Rows:
    """Attribution rows: the claiming models (names joined by ';' in CSV) and every model's
    score and p-value; the columns name α, so a resumed run must use the same."""

    def __init__(self, models: Sequence[str], alpha: float):
        self.models, self.alpha = list(models), alpha

    def columns(self) -> list:
        return ["path", f"claimed_by@alpha={self.alpha:g}"] + [
            f"{kind}_{m}" for m in self.models for kind in ("score", "p_value")]


class AttributionCsv(_Rows, CsvRows):
    def header(self) -> str:
        return self._line(self.columns())

    def lines(self, names, scores, p, claimed) -> str:
        rows = []
        for i, name in enumerate(names):
            if "\n" in name or "\r" in name:
                raise ValueError(f"{name!r}: a file name with a line break, which CSV rows "
                                 "cannot hold here: expected names without line breaks (or "
                                 "write .jsonl)")
            rows.append(self._line(
                [name, ";".join(m for m, c in zip(self.models, claimed[:, i]) if c)] +
                [repr(float(v)) for pair in zip(scores[:, i], p[:, i]) for v in pair]))
        return "".join(rows)

    def path_of(self, line: str) -> str:
        import csv

        fields = next(csv.reader([line]))
        if len(fields) != len(self.columns()):
            raise ValueError(f"{len(fields)} fields, expected {len(self.columns())}")
        [float(v) for v in fields[2:]]
        return fields[0]


class AttributionJsonl(_Rows, JsonlRows):
    def lines(self, names, scores, p, claimed) -> str:
        return "".join(json.dumps({
            "path": name, "claimed_by": [m for m, c in zip(self.models, claimed[:, i]) if c],
            "models": {m: {"score": float(scores[k, i]), "p_value": float(p[k, i])}
                       for k, m in enumerate(self.models)}}) + "\n"
            for i, name in enumerate(names))

    def path_of(self, line: str) -> str:
        row = json.loads(line)
        if not (isinstance(row, dict) and isinstance(row.get("path"), str) and "models" in row):
            raise ValueError("expected an object with 'path' and 'models'")
        return row["path"]


def write_attribution(registry: Registry, refs: Sequence, out, *, sidecar: dict,
                      alpha: float = DEFAULT_ALPHA, batch_size: int = 256,
                      overwrite: bool = False, progress: bool = False,
                      stack: Optional[bool] = None, perturbation=None, seed: int = 0
                      ) -> tuple[Path, int]:
    """Attribute ``refs`` against every registry entry into ``out`` (.csv or .jsonl), resumably,
    as :func:`flipad_jax.scoring.write_scores` writes scores (``OUT.partial`` and its sidecar,
    renamed to ``OUT`` when complete). Returns ``(out, rows resumed from an earlier run)``."""
    from flipad_jax import scoring
    from flipad_jax.images import read_images

    out = scoring.check_output(out, overwrite=overwrite)
    alpha = check_alpha(alpha)
    fmt = (AttributionCsv if out.suffix.lower() == ".csv" else AttributionJsonl)(
        registry.names, alpha)
    names = [r.name for r in refs]
    sidecar = dict(sidecar, inputs_sha256=scoring.inputs_digest(names), n_inputs=len(names),
                   perturb=None if perturbation is None else [str(perturbation), seed])
    detectors = registry.detectors
    check_int("--batch-size", batch_size)
    with PartialOutput(out, fmt, sidecar, overwrite=overwrite) as sink:
        todo = sink.remaining(refs)
        with tqdm(total=len(refs), initial=len(refs) - len(todo), disable=not progress,
                  desc="attributing", unit="img") as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                x = read_images(batch, registry.output_range, shape=registry.image_shape,
                                shape_from="(the registry's input shape)",
                                perturbation=perturbation, seed=seed)
                scores = scores_many(detectors, x, stack=stack)
                p = np.stack([p_values(d.val_scores_, s) for d, s in zip(detectors, scores)])
                sink.append(fmt.lines([r.name for r in batch], scores, p, claims(p, alpha)),
                            len(batch))
                bar.update(len(batch))
        return sink.finish(len(refs)), len(refs) - len(todo)


# -- the demo's confusion table of claims ----------------------------------------------------------

def claims_table(p: Mapping[str, Mapping[str, np.ndarray]], alpha: float = DEFAULT_ALPHA
                 ) -> tuple[str, dict]:
    """Confusion table of claims: rows the true source, columns the models claiming.

    Args:
      p: ``p[model][source]``, the ``(n,)`` p-values of a source's images under each model's
        detector; rows are the sources every model scored (in the first model's order).
      alpha: a model claims an image where p ≥ alpha.

    Returns:
      ``(markdown, counts)``: counts[source] = {"n", each model's number of claims, "none"
      (claimed by no model), "several" (by two or more)}; the markdown shows percentages.
    """
    alpha = check_alpha(alpha)
    models = list(p)
    if not models:
        raise ValueError("p={}: expected p-values of at least one model")
    sources = [s for s in p[models[0]] if all(s in p[m] for m in models)]
    counts = {}
    for s in sources:
        n = {len(p[m][s]) for m in models}
        if len(n) != 1:
            raise ValueError(f"source {s!r}: {sorted(n)} p-values under different models: "
                             "expected the same images under every model")
        claimed = np.stack([claims(p[m][s], alpha) for m in models])
        per_image = claimed.sum(axis=0)
        counts[s] = {"n": n.pop(), **{m: int(c) for m, c in zip(models, claimed.sum(axis=1))},
                     "none": int((per_image == 0).sum()), "several": int((per_image >= 2).sum())}
    cols = models + ["none", "several"]
    lines = [f"Claims at α = {alpha:g} (% of each source's test images that a model claims, "
             "p ≥ α; open world: an image may be claimed by none or several)", "",
             "| true source | " + " | ".join(cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for s, c in counts.items():
        lines.append(f"| {s} | " + " | ".join(f"{100 * c[k] / c['n']:.1f}" for k in cols) + " |")
    return "\n".join(lines), counts
