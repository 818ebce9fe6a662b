"""A device bounds its own contribution before masking: L2 clip, capped weight, unbiased stochastic rounding.

Why: under secure aggregation the server sees only the sum, so it cannot screen replies one by one
(``fedpersona.strategies.validation`` needs individual updates). Each honest device therefore clips its
update x to L2 norm C, caps its aggregation weight at W, sends ``w * x`` and ``w`` (FedAvg needs the sum of
both), quantized into integers mod 2^b; the server decodes the sum and checks it against n times the bound.

The arithmetic (``QuantizationPlan``), for at most N summands and b bits per coordinate:

* a coordinate of ``w * clip(x)`` lies in [-B, B] with B = W * C (an L2 bound bounds every coordinate);
* it is scaled by s = L / B and stochastically rounded to an integer q with |q| <= L, where
  L = floor(2^(b-1) / N) - 1 (capped at 2^52, where float64 stops holding every integer);
* the sum of N such q lies in [-N L, N L], inside [-2^(b-1), 2^(b-1)): read as a signed (two's
  complement) b-bit number it is exact, i.e. the cohort's sum never wraps mod 2^b;
* so b bits buy: 1 sign bit, ceil(log2 N) bits of headroom for the sum, and about
  b - 1 - log2 N bits of resolution per device: b = 32, N = 1,000 leaves 21 bits (L = 2,147,482);
  b = 32 keeps the masked vector as small on the wire as plain FedAvg's float32.

Stochastic rounding (round up with probability equal to the fractional part) is unbiased, E[q] = s z,
so the dequantized sum is unbiased; each coordinate's rounding error is below 1/s in absolute value
(variance at most 1/(4 s^2)), hence the sum of n dequantized contributions is within n / s = n B / L of
the float sum, coordinate-wise, always (``error_bound``), and typically within sqrt(n) / (2 s).
The weight is quantized the same way on its own scale (s_w = L / W).

What this does *not* stop: the server cannot check one device's bound. A malicious device can encode
any integers; the decoded sum's check (``decode``) only bounds the total, so one such device can move
the sum anywhere inside n times the honest bound (L2: n W C) -- the "within its bound" of the threat
model holds per honest device, and for the cohort as a whole. Per-device proofs (zero-knowledge range
proofs: e.g. Bell et al. 2022 ACORN, Lycklama et al. 2023 RoFL) are out of scope.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedpersona.errors import UsageError
from fedpersona.secagg.errors import ProtocolError
from fedpersona.secagg.masks import check_field_vector, check_modulus_bits

__all__ = ["QuantizationPlan", "clip_l2", "from_field", "stochastic_round", "to_field"]

_EXACT_FLOAT_INTEGER = 2**52


def clip_l2(update: np.ndarray, clip_norm: float) -> np.ndarray:
    """``update * min(1, C / ||update||_2)`` in float64 (a new array).

    Args:
        update: float array of any shape, finite.
        clip_norm: C > 0.

    Returns:
        float64 array of ``update``'s shape with L2 norm <= C.

    Raises:
        UsageError: a non-finite update or C <= 0.
    """
    x = np.asarray(update, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise UsageError("secure aggregation: the update holds NaN or Inf; nothing can be sent")
    if not clip_norm > 0:
        raise UsageError(f"secure aggregation: clip_norm={clip_norm} must be > 0")
    norm = float(np.linalg.norm(x))
    return x * (clip_norm / norm) if norm > clip_norm else x.copy()


def stochastic_round(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unbiased stochastic rounding: floor(v) + 1 with probability v - floor(v), else floor(v).

    Args:
        values: float64 array, |v| <= 2^52.
        rng: NumPy generator for the coin flips (need not be cryptographic: it only adds noise).

    Returns:
        int64 array of ``values``' shape with E[result] = values.
    """
    floor = np.floor(values)
    up = rng.random(values.shape) < (values - floor)
    return floor.astype(np.int64) + up


def to_field(signed: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Signed integers (int64) to their residues mod 2^b (two's complement), as uint64.

    Args:
        signed: int64 array with values in [-2^(b-1), 2^(b-1)).
        modulus_bits: b.

    Returns:
        uint64 array of values in [0, 2^b).
    """
    out = signed.astype(np.uint64)  # wraps negatives mod 2^64
    if modulus_bits < 64:
        np.bitwise_and(out, np.uint64((1 << modulus_bits) - 1), out=out)
    return out


def from_field(residues: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Residues mod 2^b to the signed integers in [-2^(b-1), 2^(b-1)) they represent, as int64.

    Args:
        residues: uint64 array of values in [0, 2^b).
        modulus_bits: b.

    Returns:
        int64 array (sign-extended from bit b-1).
    """
    shift = np.uint64(64 - modulus_bits)
    return (residues << shift).view(np.int64) >> np.int64(64 - modulus_bits)


@dataclass(frozen=True)
class QuantizationPlan:
    """How devices encode their contributions so that the sum of at most ``max_summands`` never wraps.

    Args:
        clip_norm: C, the L2 norm an update is clipped to (units of the update).
        weight_cap: W, the largest aggregation weight a device may claim (e.g. examples), > 0.
        max_summands: N, the most contributions one sum may hold (the round's cohort size).
        modulus_bits: b, bits per coordinate: values are mod 2^b, 2 <= b <= 64 (default 32).

    Raises:
        UsageError: a parameter out of range, or b too small for N (no resolution left).
    """

    clip_norm: float
    weight_cap: float
    max_summands: int
    modulus_bits: int = 32

    def __post_init__(self) -> None:
        check_modulus_bits(self.modulus_bits)
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise UsageError(f"secure aggregation: clip_norm={self.clip_norm} must be finite and > 0")
        if not (math.isfinite(self.weight_cap) and self.weight_cap > 0):
            raise UsageError(f"secure aggregation: weight_cap={self.weight_cap} must be finite and > 0")
        if isinstance(self.max_summands, bool) or not isinstance(self.max_summands, int) \
                or self.max_summands < 1:
            raise UsageError(f"secure aggregation: max_summands={self.max_summands!r} must be an int >= 1")
        if self.levels < 1:
            raise UsageError(f"secure aggregation: {self.modulus_bits} bits per coordinate leave no "
                             f"resolution for {self.max_summands} summands; raise modulus_bits to at least "
                             f"{math.ceil(math.log2(self.max_summands)) + 3}")

    @property
    def levels(self) -> int:
        """L: the largest |q| one device sends, floor(2^(b-1) / N) - 1, at most 2^52."""
        return min((1 << (self.modulus_bits - 1)) // self.max_summands - 1, _EXACT_FLOAT_INTEGER)

    @property
    def scale(self) -> float:
        """s = L / (W C): integer units per unit of a weighted update coordinate."""
        return self.levels / (self.weight_cap * self.clip_norm)

    @property
    def weight_scale(self) -> float:
        """s_w = L / W: integer units per unit of weight."""
        return self.levels / self.weight_cap

    def vector_length(self, num_params: int) -> int:
        """Coordinates of an encoded contribution: the update's plus one for the weight."""
        return num_params + 1

    def error_bound(self, num_summands: int) -> float:
        """Worst-case |dequantized sum - float sum| of one weighted-update coordinate: n / s.

        Args:
            num_summands: n, the contributions in the sum.

        Returns:
            The bound, in units of the update (the weight's is ``num_summands / weight_scale``).
        """
        return num_summands / self.scale

    def encode(self, update: np.ndarray, weight: float, rng: np.random.Generator) -> np.ndarray:
        """A device's contribution: clip, cap the weight, scale, round stochastically, reduce mod 2^b.

        Args:
            update: the float update (shared tensors minus what the device received), flattened, (d,).
            weight: the aggregation weight the device claims, >= 0; capped at W.
            rng: generator for stochastic rounding.

        Returns:
            uint64 array of shape (d + 1,): the quantized ``w * clip(update)`` then the quantized ``w``.

        Raises:
            UsageError: a non-finite update or weight, a negative weight, or an update that is not 1-D.
        """
        x = np.asarray(update)
        if x.ndim != 1:
            raise UsageError(f"secure aggregation: encode wants a flat (d,) update, got shape {x.shape}")
        if not (math.isfinite(weight) and weight >= 0):
            raise UsageError(f"secure aggregation: weight={weight} must be finite and >= 0")
        w = min(float(weight), self.weight_cap)
        scaled = clip_l2(x, self.clip_norm)
        scaled *= w * self.scale
        q = np.empty(x.shape[0] + 1, dtype=np.int64)
        q[:-1] = stochastic_round(scaled, rng)
        q[-1] = stochastic_round(np.array([w * self.weight_scale]), rng)[0]
        np.clip(q, -self.levels, self.levels, out=q)  # float rounding at the boundary only
        return to_field(q, self.modulus_bits)

    def decode(self, total: np.ndarray, num_summands: int) -> tuple[np.ndarray, float]:
        """Dequantize an unmasked sum and check it lies within ``num_summands`` times the bound.

        Args:
            total: uint64 array (d + 1,), the sum mod 2^b of ``num_summands`` encoded contributions.
            num_summands: n, 1 <= n <= N.

        Returns:
            (sum of ``w * clip(update)``, float64 (d,); sum of weights, float).

        Raises:
            UsageError: n outside [1, N].
            ProtocolError: the sum breaks the bound (a coordinate beyond n L, the weighted sum's L2 norm
                beyond n W C plus rounding, or a negative weight sum): a contribution was out of bound.
        """
        if not 1 <= num_summands <= self.max_summands:
            raise UsageError(f"secure aggregation: {num_summands} summands, the plan allows 1 to "
                             f"{self.max_summands}")
        check_field_vector(total, total.shape[0] if isinstance(total, np.ndarray) else -1,
                           self.modulus_bits, "the unmasked sum")
        signed = from_field(total, self.modulus_bits)
        limit = num_summands * self.levels
        if signed.size == 0 or int(np.abs(signed).max()) > limit:
            raise ProtocolError(f"the unmasked sum leaves the bound of {num_summands} contributions: "
                                "a device sent an out-of-bound contribution")
        weighted = signed[:-1].astype(np.float64) / self.scale
        weight_sum = float(signed[-1]) / self.weight_scale
        d = weighted.shape[0]
        l2_limit = num_summands * self.weight_cap * self.clip_norm + math.sqrt(d) * self.error_bound(num_summands)
        if float(np.linalg.norm(weighted)) > l2_limit * (1 + 1e-9) or weight_sum < 0:
            raise ProtocolError(f"the unmasked sum leaves the L2 bound of {num_summands} contributions "
                                f"(n W C = {num_summands * self.weight_cap * self.clip_norm:g}) or its weight "
                                "sum is negative: a device sent an out-of-bound contribution")
        return weighted, weight_sum
