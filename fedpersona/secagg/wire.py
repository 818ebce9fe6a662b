"""A masked vector on the wire: its values mod 2^b in the narrowest unsigned integer type that holds b bits.

Why: the protocol computes on ``numpy.uint64`` (``masks``), 8 bytes a coordinate, but a vector mod 2^b
needs only b bits. With the default b = 32 a masked vector packed to ``uint32`` is exactly as large as a
plain float32 update, so secure aggregation costs no more bytes up per coordinate than FedAvg; b <= 16
packs to ``uint16``. (Bit-level packing of, say, b = 24 would save another quarter; not worth the
unaligned copies here.) The receiver unpacks and validates: dtype, shape and range, as
``masks.check_field_vector``.
"""

from __future__ import annotations

import numpy as np

from fedpersona.secagg.errors import ProtocolError
from fedpersona.secagg.masks import check_field_vector, check_modulus_bits

__all__ = ["pack_vector", "unpack_vector", "wire_dtype"]


def wire_dtype(modulus_bits: int) -> np.dtype:
    """The unsigned integer type a vector mod 2^b travels in: uint16, uint32 or uint64.

    Args:
        modulus_bits: b, 2..64.

    Returns:
        The numpy dtype.
    """
    bits = check_modulus_bits(modulus_bits)
    return np.dtype(np.uint16 if bits <= 16 else np.uint32 if bits <= 32 else np.uint64)


def pack_vector(vector: np.ndarray, modulus_bits: int) -> np.ndarray:
    """``vector`` (uint64, values < 2^b) in its wire type.

    Args:
        vector: ``numpy.uint64`` array (d,), values in [0, 2^b).
        modulus_bits: b.

    Returns:
        A new array of ``wire_dtype(b)``, the same values.

    Raises:
        ProtocolError: not a uint64 vector of values below 2^b.
    """
    check_field_vector(vector, vector.shape[0] if isinstance(vector, np.ndarray) and vector.ndim == 1 else -1,
                       modulus_bits, "the vector to pack")
    return vector.astype(wire_dtype(modulus_bits))


def unpack_vector(packed: object, length: int, modulus_bits: int, what: str = "a masked vector") -> np.ndarray:
    """A received vector back to ``numpy.uint64``, checked.

    Args:
        packed: what arrived: a 1-D array of ``wire_dtype(b)``.
        length: d, the coordinates expected.
        modulus_bits: b.
        what: names the vector in an error.

    Returns:
        ``numpy.uint64`` array (d,), values < 2^b.

    Raises:
        ProtocolError: another type, dtype or shape, or a value outside [0, 2^b).
    """
    want = wire_dtype(modulus_bits)
    if not isinstance(packed, np.ndarray) or packed.dtype != want:
        kind = f"dtype {packed.dtype}" if isinstance(packed, np.ndarray) else f"a {type(packed).__name__}"
        raise ProtocolError(f"{what} must travel as a {want} array, got {kind}")
    if packed.shape != (length,):
        raise ProtocolError(f"{what} has shape {packed.shape}, expected ({length},)")
    return check_field_vector(packed.astype(np.uint64), length, modulus_bits, what)
