"""Per-layer comparison of MLX outputs against the reference, and its text table."""

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """Pass when max|mlx - ref| <= atol + rtol * max|ref|."""

    atol: float
    rtol: float = 0.0
    reason: str = ""

    def bound(self, scale: float) -> float:
        return self.atol + self.rtol * scale


@dataclass
class LayerResult:
    name: str
    shape: tuple
    max_abs: float
    scale: float  # max |reference|
    tol: Tolerance

    @property
    def max_rel(self) -> float:
        return self.max_abs / self.scale if self.scale > 0 else (0.0 if self.max_abs == 0 else np.inf)

    @property
    def passed(self) -> bool:
        return bool(self.max_abs <= self.tol.bound(self.scale))


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu()
        if x.is_complex():
            import torch

            x = torch.view_as_real(x)
        return x.numpy()
    x = np.asarray(x)
    if np.iscomplexobj(x):
        x = np.stack([x.real, x.imag], axis=-1)
    return x


def compare(name: str, mlx, ref, tol: Tolerance) -> LayerResult:
    """Compare one output; a shape mismatch or a NaN on one side only is an infinite error."""
    a = _as_numpy(mlx).astype(np.float64)
    b = _as_numpy(ref).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{name}: MLX shape {a.shape} != reference shape {b.shape}")
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if (nan_a != nan_b).any():
        err = np.inf
    else:
        diff = np.abs(np.where(nan_a, 0.0, a) - np.where(nan_b, 0.0, b))
        err = float(diff.max()) if diff.size else 0.0
    finite_ref = np.abs(b[np.isfinite(b)])
    scale = float(finite_ref.max()) if finite_ref.size else 0.0
    return LayerResult(name, b.shape, err, scale, tol)


@dataclass
class Report:
    title: str
    reference: str
    layers: List[LayerResult] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)  # traced on one side only

    def add(self, result: LayerResult) -> LayerResult:
        self.layers.append(result)
        return result

    def extend(self, results: Iterable[LayerResult]):
        self.layers.extend(results)

    @property
    def first_failure(self) -> Optional[LayerResult]:
        return next((r for r in self.layers if not r.passed), None)

    @property
    def worst(self) -> Optional[LayerResult]:
        """The layer closest to (or furthest past) its bound."""
        def ratio(r: LayerResult) -> float:
            bound = r.tol.bound(r.scale)
            return r.max_abs / bound if bound > 0 else (0.0 if r.max_abs == 0 else np.inf)

        return max(self.layers, key=ratio, default=None)

    @property
    def passed(self) -> bool:
        return not self.missing and all(r.passed for r in self.layers)

    def summary(self) -> str:
        if not self.layers:
            return f"{self.title}: nothing compared"
        worst = self.worst
        head = f"{self.title}: {sum(r.passed for r in self.layers)}/{len(self.layers)} within tolerance"
        head += f"; worst {worst.name} max abs {worst.max_abs:.3g} (rel {worst.max_rel:.3g})"
        first = self.first_failure
        if first is not None:
            head += f"; FIRST DIVERGENCE at {first.name}: {first.max_abs:.3g} > {first.tol.bound(first.scale):.3g}"
        if self.missing:
            head += f"; traced on one side only: {', '.join(self.missing)}"
        return head

    def table(self) -> str:
        rows = [("layer", "shape", "max abs", "max rel", "bound", "ok")]
        for r in self.layers:
            rows.append((
                r.name, "x".join(map(str, r.shape)), f"{r.max_abs:.3e}", f"{r.max_rel:.3e}",
                f"{r.tol.bound(r.scale):.3e}", "ok" if r.passed else "FAIL",
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [f"{self.title} vs {self.reference}"]
        for i, row in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append(self.summary())
        return "\n".join(lines)


def compare_traces(
    report: Report, mlx_trace: Dict[str, object], ref_trace: Dict[str, object], tol: Tolerance,
    tolerances: Optional[Dict[str, Tolerance]] = None,
) -> Report:
    """Compare two traces by name, in the reference's execution order."""
    tolerances = tolerances or {}
    for name, ref in ref_trace.items():
        if name not in mlx_trace:
            report.missing.append(f"{name} (reference only)")
            continue
        report.add(compare(name, mlx_trace[name], ref, tolerances.get(name, tol)))
    untraceable = getattr(ref_trace, "untraceable", [])

    def hidden(name: str) -> bool:
        base = name.split("#")[0]
        return any(base == u or base.startswith(u + ".") for u in untraceable)

    report.missing.extend(f"{n} (MLX only)" for n in mlx_trace if n not in ref_trace and not hidden(n))
    return report
