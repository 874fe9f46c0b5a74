"""What a training user contributes to a secure-aggregation round, as the one vector SecAgg+ sums.

SecAgg+ sums integer vectors: Flower's secaggplus_mod clips each float to [-CLIPPING_RANGE, CLIPPING_RANGE] and
quantizes it to QUANTIZATION_RANGE levels (stochastic rounding, unbiased), and masks it modulo MODULUS_RANGE.
So a client sends its *update* (new task LoRA minus the global one: small, so the quantization step, 2*16/2**22
= 7.6e-6 per client, is far below it) and not the weights, and every client has weight 1 (a weight w < max_weight
scales values by w/max_weight before quantization and loses precision). The user's training loss and answer-label
shares ride in the same vector, so the server learns only their averages too (what FedAvg's metric aggregation
reports). The sum of a round's quantized values must stay below MODULUS_RANGE, or it wraps around and the average
comes out wrong with no error (Flower checks only its neighbour count): each of n clients adds up to
QUANTIZATION_RANGE per value (its weight too), so a round of n clients quantizes to the finest power of two q <= 2**22
with n * q < 2**32 (`quantization_range`): 2**22 up to 1,023 clients, 2**21 up to 2,047, 2**19 for the 5,656 nodes
of an item-table round over six MovieLens-100Ks, each halving doubling the step.

Flower's SecAgg+ expands each mask's seed (a 32-byte key) with numpy's RandomState after folding it to 32 bits
(`pseudo_rand_gen`; flwrlabs/flower#7522), so a mask carried 32 bits of entropy and came from a generator that is not
a cryptographic one. `masks_from_whole_seed` expands the whole seed with AES-256 in counter mode instead (the
`cryptography` package, which Flower's SecAgg+ uses for its keys); both sides put it in place of Flower's, the
client in client/app.py and the server in server/secure_aggregation.py, since the server regenerates the masks it
removes and the two must agree.

Flower's stochastic rounding draws from numpy's global random state, which nothing seeds, so the same vectors
summed twice gave sums a few steps apart, and a repeated run differed (simulation/node_ids.py). A client therefore
rounds its vector onto the quantization steps itself (`on_quantization_grid`), as unbiased as Flower's and with
bits drawn from the vector's own bytes; Flower's rounding then leaves every value as it is.
"""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

CLIPPING_RANGE = 16.0  # covers task-LoRA updates (Adam moves a weight ~lr per step) and training losses < 16
QUANTIZATION_RANGE = 2**22  # Flower's default: the finest levels, those of a round of up to 1,023 clients
MODULUS_RANGE = 2**32  # Flower's default (and its maximum)
SHARES = 1.0  # each client's secrets are shared with every client of the round (a float: a share of the round)
THRESHOLD = 0.5  # shares needed to unmask: the server must collude with half a round's clients to unmask one


def pack_update(update: list[np.ndarray], loss: float | None, answer_shares: list[float]) -> list[np.ndarray]:
    """[update tensors..., [loss], answer shares (if the task has labels)]; without a loss (DP: the update goes
    alone) just the update. A value SecAgg+ would clip is an error."""
    vector = [np.asarray(a, dtype=np.float64) for a in update]
    if loss is not None:
        vector.append(np.array([loss], dtype=np.float64))
    if answer_shares:
        vector.append(np.asarray(answer_shares, dtype=np.float64))
    largest = max(float(np.abs(a).max()) for a in vector if a.size)
    if not largest <= CLIPPING_RANGE:
        raise ValueError(f"a value of {largest:.3g} exceeds SecAgg+'s clipping range {CLIPPING_RANGE}: the sum would "
                         "be wrong (a diverged update or loss)")
    return vector


def quantization_range(round_clients: int) -> int:
    """The quantization levels of a SecAgg+ round of `round_clients` clients: the finest power of two, at most
    QUANTIZATION_RANGE, at which their sum stays below MODULUS_RANGE."""
    if round_clients < 1:
        raise ValueError(f"a secure-aggregation round needs a client, got {round_clients}")
    levels = QUANTIZATION_RANGE
    while round_clients * levels >= MODULUS_RANGE:
        levels //= 2
    return levels


def quantum(round_clients: int) -> float:
    """One quantization step of a round of `round_clients` clients (2**-17 up to 1,023): a power of two, so its
    multiples stay exact."""
    return 2 * CLIPPING_RANGE / quantization_range(round_clients)


def on_quantization_grid(vector: list[np.ndarray], round_clients: int) -> list[np.ndarray]:
    """`vector` stochastically rounded to multiples of the round's quantum (down or up, with the chance that keeps
    its mean), the random bits seeded by the vector's bytes: the same vector always rounds the same way, and the
    server, which never sees it, cannot predict the rounding."""
    step = quantum(round_clients)
    arrays = [np.asarray(a, dtype=np.float64) for a in vector]
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    rounded = []
    for a in arrays:
        steps = a / step  # exact: the step is a power of two
        low = np.floor(steps)
        rounded.append((low + (rng.random(a.shape) < steps - low)) * step)
    return rounded


def unpack_update(
    vector: list[np.ndarray], num_tensors: int
) -> tuple[list[np.ndarray], float | None, list[float]]:
    """(update tensors, loss or None, answer shares) of a packed vector, or of the average of packed vectors."""
    rest = vector[num_tensors:]
    loss = float(rest[0][0]) if rest else None
    return vector[:num_tensors], loss, [float(x) for x in rest[1]] if len(rest) > 1 else []


def masks_from_whole_seed(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """SecAgg+'s masks, in place of Flower's `pseudo_rand_gen` (same arguments and result: one int64 array per
    shape, values in [0, num_range)): AES-256-CTR keyed by SHA-256 of the whole seed, 4 bytes a value (num_range is
    a power of two up to 2**32, as Flower requires of its modulus: the low bits carry no bias)."""
    if num_range & (num_range - 1) or not 0 < num_range <= 2**32:
        raise ValueError(f"SecAgg+'s modulus must be a power of two up to 2**32, got {num_range}")
    sizes = [int(np.prod(shape)) for shape in dimensions_list]  # a shape () is one value
    key = hashlib.sha256(b"oppu-fl secagg+ mask\0" + seed).digest()
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(4 * sum(sizes)))
    values = (np.frombuffer(stream, dtype="<u4") & np.uint32(num_range - 1)).astype(np.int64)
    masks, start = [], 0
    for shape, size in zip(dimensions_list, sizes):
        masks.append(values[start:start + size].reshape(shape))
        start += size
    return masks
