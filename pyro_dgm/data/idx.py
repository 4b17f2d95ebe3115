"""The IDX file format of MNIST (LeCun et al.), read from and written to bytes.

An IDX file is a 4-byte magic number -- two zero bytes, a type code, the number of dimensions --
followed by each dimension as a big-endian uint32 and then the values, big-endian, in C order.
"""

__all__ = ["read_idx", "write_idx"]

import math
import struct

import numpy as np
import torch
from torch import Tensor

# type code -> (big-endian numpy dtype, torch dtype)
_IDX_TYPES: dict[int, tuple[np.dtype, torch.dtype]] = {
    0x08: (np.dtype(">u1"), torch.uint8),
    0x09: (np.dtype(">i1"), torch.int8),
    0x0B: (np.dtype(">i2"), torch.int16),
    0x0C: (np.dtype(">i4"), torch.int32),
    0x0D: (np.dtype(">f4"), torch.float32),
    0x0E: (np.dtype(">f8"), torch.float64),
}
_TYPE_CODES: dict[torch.dtype, int] = {dt: code for code, (_, dt) in _IDX_TYPES.items()}


def read_idx(data: bytes) -> Tensor:
    """Parse the bytes of an (uncompressed) IDX file.

    :param data: the whole file.
    :returns: a tensor of the stored shape, with dtype ``uint8``, ``int8``, ``int16``, ``int32``,
        ``float32`` or ``float64`` as given by the type code, in native byte order, owning its
        memory (writable).
    :raises ValueError: if the magic number, type code or length is not that of an IDX file.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError("not an IDX file: the first two bytes must be zero")
    code, ndim = data[2], data[3]
    if code not in _IDX_TYPES:
        raise ValueError(f"not an IDX file: unknown type code 0x{code:02X}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"IDX file truncated: {len(data)} bytes, header alone needs {header}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    big_endian, torch_dtype = _IDX_TYPES[code]
    expected = header + big_endian.itemsize * math.prod(shape)
    if len(data) != expected:
        raise ValueError(f"IDX file of shape {shape} needs {expected} bytes, not {len(data)}")
    values = np.frombuffer(data, dtype=big_endian, offset=header).reshape(shape)
    # The copy both swaps to native byte order and detaches from the read-only bytes.
    return torch.from_numpy(values.astype(big_endian.newbyteorder("="), copy=True))


def write_idx(tensor: Tensor) -> bytes:
    """Serialize a tensor as an (uncompressed) IDX file.

    :param tensor: any shape with at most 255 dimensions; dtype ``uint8``, ``int8``, ``int16``,
        ``int32``, ``float32`` or ``float64`` (cast ``int64`` indices to ``int32`` first).
    :returns: the file's bytes; :func:`read_idx` inverts this exactly.
    :raises TypeError: for a dtype that IDX cannot store.
    """
    if tensor.dtype not in _TYPE_CODES:
        raise TypeError(f"IDX cannot store dtype {tensor.dtype}; supported: {list(_TYPE_CODES)}")
    if tensor.dim() > 255:
        raise ValueError(f"IDX stores at most 255 dimensions, got {tensor.dim()}")
    code = _TYPE_CODES[tensor.dtype]
    big_endian = _IDX_TYPES[code][0]
    header = bytes([0, 0, code, tensor.dim()]) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    values = tensor.detach().cpu().contiguous().numpy().astype(big_endian, copy=False)
    return header + values.tobytes()
