"""A model summary as data: its rows (:class:`LayerSummary`), totals (:class:`Totals`) and
tables (:class:`ModelSummary`: ``print``, ``to_dict``, ``to_markdown``).

:func:`binax.summary` computes them (accounting rules: :mod:`binax.summary`).
"""

from __future__ import annotations

import dataclasses

__all__ = ["ModelSummary", "LayerSummary", "Totals"]


class _Counts:
    """Parameter and MAC splits shared by a row and the totals (from ``params``,
    ``params_by_bits``, ``trainable_params``, ``macs`` and ``binary_macs``)."""

    @property
    def non_trainable_params(self) -> int:
        return self.params - self.trainable_params

    @property
    def binary_params(self) -> int:
        return self.params_by_bits.get(1, 0)

    @property
    def float_params(self) -> int:
        return sum(n for b, n in self.params_by_bits.items() if b >= 16)

    @property
    def float_macs(self) -> int:
        return self.macs - self.binary_macs


@dataclasses.dataclass(frozen=True)
class LayerSummary(_Counts):
    """One row of a summary: a layer (module) or a pooling / shortcut operation."""

    name: str  # module path, '/'-joined (an operation: its module's path + '/max_pool' ...)
    kind: str  # 'BinaryConv', 'Conv (float)', 'BatchNorm', 'MaxPool', 'Add (shortcut)' ...
    output_shape: tuple[int, ...]  # per example (batch axis dropped)
    params_by_bits: dict[int, int] = dataclasses.field(default_factory=dict)  # bit-width -> count
    trainable_params: int = 0
    memory_bits: int = 0
    macs: int = 0
    mac_bits: int | None = None  # precision of the MACs: max(input bits, kernel bits)
    binary_macs: int = 0
    binary_ops: int = 0
    input_bits: int | None = None  # of the (quantized) input, for dense/conv layers
    kernel_bits: int | None = None
    bases: tuple[int, int] | None = None  # ABC-Net: (M weight bases, N activation bases)

    @property
    def params(self) -> int:
        return sum(self.params_by_bits.values())

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "output_shape": list(self.output_shape),
            "input_bits": self.input_bits,
            "kernel_bits": self.kernel_bits,
            "params": self.params,
            "params_by_bits": {str(b): n for b, n in sorted(self.params_by_bits.items())},
            "trainable_params": self.trainable_params,
            "non_trainable_params": self.non_trainable_params,
            "memory_bits": self.memory_bits,
            "macs": self.macs,
            "mac_bits": self.mac_bits,
            "binary_macs": self.binary_macs,
            "float_macs": self.float_macs,
            "binary_ops": self.binary_ops,
            "bases": list(self.bases) if self.bases else None,
        }


@dataclasses.dataclass(frozen=True)
class Totals(_Counts):
    """Whole-model totals (sums of the rows). Sizes are in bytes."""

    params: int
    params_by_bits: dict[int, int]
    trainable_params: int
    memory_bytes: float  # packed: each parameter at its bit-width
    float32_bytes: int  # every parameter as float32
    macs_by_bits: dict[int, int]
    binary_macs: int
    binary_ops: int

    @property
    def compression_ratio(self) -> float:
        """float32 size / packed size."""
        return self.float32_bytes / self.memory_bytes if self.memory_bytes else float("nan")

    @property
    def macs(self) -> int:
        return sum(self.macs_by_bits.values())

    @property
    def binary_mac_fraction(self) -> float:
        """Share of binary MACs (on XNOR-popcount) among all MACs."""
        return self.binary_macs / self.macs if self.macs else 0.0

    def to_dict(self) -> dict:
        return {
            "params": self.params,
            "params_by_bits": {str(b): n for b, n in sorted(self.params_by_bits.items())},
            "binary_params": self.binary_params,
            "float_params": self.float_params,
            "trainable_params": self.trainable_params,
            "non_trainable_params": self.non_trainable_params,
            "memory_bytes": self.memory_bytes,
            "float32_bytes": self.float32_bytes,
            "compression_ratio": self.compression_ratio,
            "macs": self.macs,
            "macs_by_bits": {str(b): n for b, n in sorted(self.macs_by_bits.items())},
            "binary_macs": self.binary_macs,
            "float_macs": self.float_macs,
            "binary_mac_fraction": self.binary_mac_fraction,
            "binary_ops": self.binary_ops,
        }


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """Per-layer rows and totals; ``str()`` / ``print()`` give the table."""

    model: str
    input_shape: tuple[int, ...]
    layers: list[LayerSummary]
    totals: Totals

    # The totals most callers want, at the top level as well.
    binary_params = property(lambda self: self.totals.binary_params)
    float_params = property(lambda self: self.totals.float_params)
    binary_macs = property(lambda self: self.totals.binary_macs)
    float_macs = property(lambda self: self.totals.float_macs)
    binary_ops = property(lambda self: self.totals.binary_ops)

    def layer(self, name: str) -> LayerSummary:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no layer {name!r}; layers: {', '.join(r.name for r in self.layers)}")

    def print(self) -> None:
        print(str(self))

    def to_dict(self) -> dict:
        """Rows and totals as plain Python data (JSON-ready)."""
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "layers": [r.to_dict() for r in self.layers],
            "totals": self.totals.to_dict(),
        }

    # ---- tables

    def _table(self) -> tuple[list[str], list[list[str]], list[str], set[int]]:
        """(header, rows, total row, numeric columns) as strings."""
        param_bits = sorted({b for row in self.layers for b in row.params_by_bits})
        mac_bits = sorted(self.totals.macs_by_bits)
        header = ["Layer", "Type", "In bits", "W bits", "Output shape"]
        header += [f"{self._bits_label(b)} params" for b in param_bits] + ["Memory (KiB)"]
        header += [f"{b}-bit MACs" for b in mac_bits] + ["Binary ops"]
        rows = []
        for r in self.layers:
            in_bits, w_bits = (f"{r.bases[1]}×1", f"{r.bases[0]}×1") if r.bases else (_bits(r.input_bits), _bits(r.kernel_bits))
            rows.append(
                [r.name, r.kind, in_bits, w_bits, str(r.output_shape)]
                + [_count(r.params_by_bits.get(b, 0)) for b in param_bits]
                + [f"{r.memory_bits / 8 / 1024:.2f}"]
                + [_count(r.macs if r.mac_bits == b else 0) for b in mac_bits]
                + [_count(r.binary_ops)]
            )
        t = self.totals
        total = (
            ["Total", "", "", "", ""]
            + [_count(t.params_by_bits.get(b, 0)) for b in param_bits]
            + [f"{t.memory_bytes / 1024:.2f}"]
            + [_count(t.macs_by_bits.get(b, 0)) for b in mac_bits]
            + [_count(t.binary_ops)]
        )
        return header, rows, total, set(range(2, len(header)))

    def _bits_label(self, bits: int) -> str:
        """``'3-bit'``, or ``'3×1-bit'`` where only ABC-Net's weight bases have ``bits``
        (M binary values per weight, not an M-bit quantizer)."""
        owners = [r for r in self.layers if r.params_by_bits.get(bits)]
        abc_only = bits > 1 and owners and all(r.bases and r.bases[0] == bits for r in owners)
        return f"{bits}×1-bit" if abc_only else f"{bits}-bit"

    def _lines(self) -> list[str]:
        t = self.totals
        by_bits = ", ".join(f"{n:,} {self._bits_label(b)}" for b, n in sorted(t.params_by_bits.items()))
        lines = [
            f"Total params: {t.params:,} ({by_bits})",
            f"Trainable params: {t.trainable_params:,}; non-trainable (batch statistics): {t.non_trainable_params:,}",
            f"Model size: {_size(t.memory_bytes)} packed vs {_size(t.float32_bytes)} float32 "
            f"(compression x{t.compression_ratio:.2f})",
            f"MACs: {t.macs:,} ({t.binary_macs:,} binary on XNOR-popcount, {t.float_macs:,} float; "
            f"{100 * t.binary_mac_fraction:.2f}% binary)",
            f"Binary ops: {t.binary_ops:,} (a binary MAC of P input and Q weight planes is P*Q)",
        ]
        return lines

    def __str__(self) -> str:
        header, rows, total, numeric = self._table()
        table = [header] + rows + [total]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]

        def fmt(row):
            return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

        rule = "-" * len(fmt(header))
        lines = [f"{self.model} summary, input {self.input_shape}", rule, fmt(header), rule]
        lines += [fmt(r) for r in rows] + [rule, fmt(total), rule]
        return "\n".join(lines + self._lines())

    def to_markdown(self) -> str:
        """The table as GitHub Markdown, then the totals as a list."""
        header, rows, total, numeric = self._table()
        total = ["**Total**"] + total[1:]

        def fmt(row):
            return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"

        align = ["---:" if i in numeric else "---" for i in range(len(header))]
        lines = [f"**{self.model}**, input {self.input_shape}", "", fmt(header), "|" + "|".join(align) + "|"]
        lines += [fmt(r) for r in rows] + [fmt(total), ""]
        return "\n".join(lines + [f"- {line}" for line in self._lines()])


def _count(n: int) -> str:
    return f"{n:,}" if n else "0"


def _bits(b: int | None) -> str:
    return "-" if b is None else str(b)


def _size(nbytes: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"
