"""DP noise from a cryptographic generator: ChaCha20 keystream, Gaussian in float64.

Why not torch's own generator. A site's noise must be unpredictable to whoever
sees the noised update. torch's CPU generator is Mersenne Twister, not a CSPRNG,
and its ``normal_`` forms float32 samples in float32: Gaussian samples computed at the
precision they are released in have gaps in their support that depend on the
value noised, which is what the floating-point attack on DP noise (Mironov, CCS
2012) reads. Opacus's answer, ``secure_mode``, needs ``torchcsprng``, which the package
index this platform installs from does not have (``pip index versions torchcsprng``:
no matching distribution) and which has no release for current torch.

What this does instead. :class:`SecureGaussian` draws a fresh 256-bit key and nonce
from the OS (``os.urandom``) and reads ChaCha20's keystream (``cryptography``), the
same primitive TLS uses; each 64-bit word gives a 53-bit uniform in (0, 1), and
Box-Muller turns pairs of them into standard normals in float64. Only the scaled
float64 sample is rounded, once, to the gradient's dtype. That keeps the sample's
resolution far finer than the float32 grid it lands on; it is a mitigation, not a
proof (Opacus's secure mode sums four draws instead, Holohan & Braghin 2021).

Cost on CPU (2 threads): 1.4 ms for the 0.21 M parameters of brain-tissue-seg
against 0.5 ms for ``torch.normal``, 5.2 ms against 2.3 ms for the 0.82 M of the wide
UNet. The work runs in chunks that stay in cache (one pass over 0.82 M took 7 ms).
"""

from __future__ import annotations

import math
import os

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

#: Pairs of uniforms per chunk: 32 k pairs, 512 KB of keystream, stay in cache.
_CHUNK = 1 << 15
_MANTISSA = (1 << 53) - 1


class SecureGaussian:
    """Gaussian noise for DP from ChaCha20 keyed by the OS; one instance per training call."""

    def __init__(self) -> None:
        cipher = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None)
        self._keystream = cipher.encryptor()
        self._zeros = bytes(16 * _CHUNK)
        self._buffer = bytearray(16 * _CHUNK + 64)  # update_into wants room for a block
        self._words = torch.frombuffer(self._buffer, dtype=torch.int64, count=2 * _CHUNK)
        self._uniform = torch.empty(2 * _CHUNK, dtype=torch.float64)

    def normal(self, std: float, like: torch.Tensor) -> torch.Tensor:
        """A tensor of ``like``'s shape, dtype and device, each entry ``N(0, std^2)``."""
        n = like.numel()
        half = (n + 1) // 2
        out = torch.empty(2 * half, dtype=torch.float64 if like.dtype == torch.float64
                          else torch.float32)
        for start in range(0, half, _CHUNK):
            k = min(_CHUNK, half - start)
            self._keystream.update_into(self._zeros[:16 * k], self._buffer)
            words, u = self._words[:2 * k], self._uniform[:2 * k]
            torch.bitwise_and(words, _MANTISSA, out=words)  # 53 random bits, non-negative
            u.copy_(words).add_(0.5).mul_(2.0 ** -53)  # uniform in (0, 1), never 0
            radius = u[:k].log_().mul_(-2.0).sqrt_().mul_(std)
            angle = u[k:].mul_(2.0 * math.pi)
            torch.mul(radius, torch.cos(angle), out=out[start:start + k])
            torch.mul(radius, angle.sin_(), out=out[half + start:half + start + k])
        return out[:n].view(like.shape).to(dtype=like.dtype, device=like.device)
