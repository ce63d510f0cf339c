"""Random projections x = P^T g of per-example gradients, P (p x d) defined per parameter by a seed.

The gradient g is a concatenation of per-parameter blocks (trainable() order). Every projector
defines its block of P from (seed, parameter name) alone, so P does not depend on the order in
which layers are visited, on the rank that visits them, or on which other parameters exist.

- `sparse` (default): a CountSketch / hashed sparse JL. Coordinate j of a parameter goes to bucket
  h(j) in [0, d) with sign s(j) = +-1; P has one nonzero per row. Columns have disjoint supports,
  so ||P z||^2 = sum_k col_sq_norms()[k] * z_k^2 exactly. Applying it is one index_add_.
- `hashed`: the same CountSketch with its buckets computed from (seed, name, coordinate) on the
  device whenever applied, so it holds nothing per coordinate (for full fine-tuning of big models).
- `dense`: Rademacher entries +-1/sqrt(d) (the paper's P). Held in memory when p * d * 4 bytes
  <= 256 MB, otherwise regenerated block by block from the seed on every call (slow, exact).
- `none`: identity, d = p, exact inner products for small p.

All of them satisfy E[<P^T g, P^T h>] = <g, h>. `lift(z)` = P z maps a solution z back to a change of
the trainable parameters (flat, trainable() order); `col_sq_norms()` gives ||P z|| cheaply.
P is drawn on the CPU (the same P on every device) and `to(device)` moves it where the gradients are.
`Preconditioned` wraps any of them to project Adam-preconditioned gradients (see its docstring).
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from typing import Mapping, Sequence

import torch
from torch import nn

HOLD_LIMIT_BYTES = 256 * 2**20  # never hold a dense P larger than this
WIDE_INDEX_LIMIT = 2**24  # sparse: int64 buckets up to this many coordinates, int32 above (half the memory)
BLOCK_BYTES = 32 * 2**20  # rows of a dense block regenerated at once

Layout = Sequence[tuple[str, tuple[int, ...]]]


def _generator(seed: int, *key: object) -> torch.Generator:
    """A torch.Generator seeded from the projector seed and a key (parameter name, block)."""
    digest = hashlib.sha256(":".join(str(k) for k in (seed, *key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class Projector(ABC):
    """Maps per-example gradient blocks (B, n_param) to (B, d) features; call `bind` first."""

    kind: str = ""
    scale: float = 1.0

    def __init__(self, dim: int, seed: int = 0):
        if dim <= 0 and self.kind != "none":
            raise ValueError(f"projection dimension must be positive, got {dim}")
        self.dim = dim
        self.seed = seed
        self.layout: list[tuple[str, tuple[int, ...]]] = []
        self.input_dim = 0
        self.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> "Projector":
        """Apply P on `device` (the model's, in the gradient pass): its state moves there, and what it
        makes (accumulators, lifts) is made there."""
        device = torch.device(device)
        if device != self.device:
            self.device = device
            if self.layout:  # an unbound projector has no state yet: bind makes it on this device
                self._moved()
        return self

    def _moved(self) -> None:
        """Hook for subclasses: move per-parameter state to self.device."""

    def bind(self, layout: Layout) -> "Projector":
        """Fix the parameters (name, shape) in trainable() order; the input dimension p is their total size."""
        self.layout = [(name, tuple(shape)) for name, shape in layout]
        names = [name for name, _ in self.layout]
        if len(set(names)) != len(names):
            raise ValueError("projector layout has duplicate parameter names")
        self.input_dim = sum(math.prod(shape) for _, shape in self.layout)
        self._sizes = {name: math.prod(shape) for name, shape in self.layout}
        self._bound()
        self._moved()  # what _bound made (or was given, like a preconditioner's scales) lives on self.device
        return self

    def _bound(self) -> None:
        """Hook for subclasses: precompute per-parameter state."""

    def identity(self) -> dict:
        """What makes two stores comparable: same kind, seed, dim, scale and input dimension."""
        return {"kind": self.kind, "seed": self.seed, "dim": self.dim, "scale": self.scale, "input_dim": self.input_dim}

    # ------------------------------------------------------------------ projecting
    def start(self, batch_size: int) -> torch.Tensor:
        """An empty fp32 accumulator for a batch."""
        return torch.zeros(batch_size, self.dim, device=self.device)

    @abstractmethod
    def add(self, acc: torch.Tensor, name: str, grads: torch.Tensor) -> None:
        """acc += grads @ P_name for one parameter's per-example gradients, grads (B, n_param)."""

    def result(self, acc: torch.Tensor) -> torch.Tensor:
        return acc

    def project(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Project per-example gradients given per parameter ({name: (B, *shape)}) to (B, d)."""
        acc = None
        for name, g in grads.items():
            if acc is None:
                acc = self.start(g.shape[0])
            self.add(acc, name, g.reshape(g.shape[0], -1).float())
        if acc is None:
            raise ValueError("no gradients to project")
        return self.result(acc)

    def project_flat(self, g: torch.Tensor) -> torch.Tensor:
        """Project full gradients (B, p) laid out in the bound order."""
        g = g.reshape(-1, self.input_dim) if g.dim() > 1 else g.reshape(1, -1)
        acc, start = self.start(g.shape[0]), 0
        for name, _ in self.layout:
            n = self._sizes[name]
            self.add(acc, name, g[:, start:start + n].float())
            start += n
        return self.result(acc)

    # ------------------------------------------------------------------ back to parameter space
    @abstractmethod
    def lift_param(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """(P z) restricted to one parameter, flat."""

    def lift_params(self, z: torch.Tensor) -> list[torch.Tensor]:
        """P z as per-parameter tensors shaped like the parameters, in the bound (trainable()) order."""
        z = torch.as_tensor(z, dtype=torch.float32, device=self.device).reshape(self.dim)
        return [self.lift_param(name, z).reshape(shape) for name, shape in self.layout]

    def lift(self, z: torch.Tensor) -> torch.Tensor:
        """P z as one flat (p,) vector in trainable() order: theta* + lift(z) is the reconstructed model."""
        return torch.cat([t.reshape(-1) for t in self.lift_params(z)])

    def gram(self, weights: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """P^T W P, (d, d), W = diag(weights) per parameter (default identity)."""
        return torch.diag(self.col_sq_norms(weights))

    def project_delta(self, delta: torch.Tensor) -> torch.Tensor:
        """The orthogonal projection of a flat change Delta (p,) onto range(P): P (P^T P)^+ P^T Delta.

        This is the part of Delta that a change P z can express.
        """
        x = self.project_flat(torch.as_tensor(delta, dtype=torch.float32).reshape(1, -1))[0]
        return self.lift(torch.linalg.pinv(self.gram().double()).float() @ x)

    @abstractmethod
    def col_sq_norms(self, weights: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(d,) squared column norms of P, summed over all bound parameters; with `weights` (flat, per
        parameter) the weighted sums sum_j w_j P_jk^2."""

    def _check(self, name: str, grads: torch.Tensor) -> int:
        n = self._sizes.get(name)
        if n is None:
            raise KeyError(f"projector is not bound to parameter {name!r}")
        if grads.shape[-1] != n:
            raise ValueError(f"{name}: expected {n} gradient coordinates, got {grads.shape[-1]}")
        return n


class SparseProjector(Projector):
    """CountSketch: coordinate j -> bucket h(j) with sign s(j), both drawn from (seed, parameter name).

    Signs are folded into the bucket index (bucket h for +1, d + h for -1), so applying P is a single
    index_add_ into a (B, 2d) accumulator followed by one subtraction. Buckets are held as int64 for
    small layouts; for large ones (full fine-tuning) as int32, widened per parameter when applied,
    because index_add_ is several times faster with int64 indices.
    """

    kind = "sparse"

    def _bound(self) -> None:
        self._index: dict[str, torch.Tensor] = {}
        for name, _ in self.layout:
            n = self._sizes[name]
            gen = _generator(self.seed, self.kind, name)
            bucket = torch.randint(0, self.dim, (n,), generator=gen)
            negative = torch.randint(0, 2, (n,), generator=gen)
            index = bucket + self.dim * negative
            self._index[name] = (index if self.input_dim <= WIDE_INDEX_LIMIT else index.int()).to(self.device)

    def _moved(self) -> None:
        self._index = {name: index.to(self.device) for name, index in self._index.items()}

    def start(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(batch_size, 2 * self.dim, device=self.device)

    def indices(self, name: str) -> torch.Tensor:
        """Parameter `name`'s signed buckets (int64, on the projector's device): coordinate j goes to
        column index[j] % d, with sign - where index[j] >= d."""
        return self._index[name].long()

    def add(self, acc: torch.Tensor, name: str, grads: torch.Tensor) -> None:
        self._check(name, grads)
        acc.index_add_(1, self.indices(name), grads.float())

    def result(self, acc: torch.Tensor) -> torch.Tensor:
        return acc[:, :self.dim] - acc[:, self.dim:]

    def lift_param(self, name: str, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([z, -z])[self.indices(name)]

    def col_sq_norms(self, weights: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        counts = torch.zeros(2 * self.dim, dtype=torch.float64, device=self.device)
        for name, _ in self.layout:
            w = None if weights is None else weights[name].reshape(-1).double().to(self.device)
            counts += torch.bincount(self.indices(name), weights=w, minlength=2 * self.dim)
        return (counts[:self.dim] + counts[self.dim:]).float()


PRIME = 2**31 - 1  # the hashed projector's modulus (prime): a product of two residues fits in int64


class HashedProjector(SparseProjector):
    """The sparse projector's CountSketch with buckets and signs computed, not drawn and held: for
    coordinate j of parameter `name`, h = (a j + c mod PRIME)^5 mod PRIME with keys a, c from (seed,
    name), and signed bucket h mod 2d (bucket h mod d, negative when floor(h / d) is odd), in exact
    int64 arithmetic on whatever device the gradients are on. The fifth power is a bijection mod PRIME
    (5 does not divide PRIME - 1), so h stays uniform, and it breaks the arithmetic progression a
    linear hash gives coordinates a fixed stride apart (a weight matrix's rows). It holds nothing
    per coordinate, where `sparse` holds an index per trainable parameter (4 to 8 bytes each: 26 GB
    for a 7B model's full fine-tuning), at the price of computing a parameter's buckets each time it
    is applied (about ten integer operations per coordinate). Same guarantees as sparse: columns with
    disjoint supports, E[<P^T g, P^T h>] = <g, h>; another P than sparse's."""

    kind = "hashed"

    def _bound(self) -> None:
        self._keys: dict[str, tuple[int, int, int]] = {}
        for name, _ in self.layout:
            digest = hashlib.sha256(f"{self.seed}:{self.kind}:{name}".encode()).digest()
            a, b, c = (int.from_bytes(digest[4 * k:4 * k + 4], "little") % (PRIME - 1) for k in range(3))
            self._keys[name] = (1 + a, 1 + b, c)  # a, b nonzero: every coordinate moves the hash

    def _moved(self) -> None:
        """Nothing is held on a device."""

    def indices(self, name: str) -> torch.Tensor:
        n = self._sizes[name]
        a, b, c = self._keys[name]
        j = torch.arange(n, device=self.device, dtype=torch.int64)
        if n <= PRIME:  # every product below is of two numbers under 2^31: exact in int64
            h = _mod_prime(j.mul_(a).add_(c))
        else:  # a parameter of more than 2^31 coordinates: j in base PRIME
            h = _mod_prime(_mod_prime((j % PRIME) * a) + _mod_prime((j // PRIME) * b) + c)
        h4 = _mod_prime(h * h)
        h4 = _mod_prime(h4.mul_(h4))
        h = _mod_prime(h4.mul_(h))
        two_d = 2 * self.dim
        return h.bitwise_and_(two_d - 1) if two_d & (two_d - 1) == 0 else h.remainder_(two_d)


def _mod_prime(x: torch.Tensor) -> torch.Tensor:
    """x mod PRIME for 0 <= x < 2^63, in place, by folding: 2^31 = 1 mod PRIME, so x = hi 2^31 + lo is
    hi + lo mod PRIME. Shifts, masks and adds only: an int64 division is slow on a CPU and slower
    still on a GPU, which has no instruction for it."""
    x = (x >> 31).add_(x.bitwise_and_(PRIME))  # < 2^32 + 2^31 (x's own storage is reused for the mask)
    x = (x >> 31).add_(x.bitwise_and_(PRIME))  # <= PRIME + 2
    return x.sub_(PRIME * (x >= PRIME))


class DenseProjector(Projector):
    """Rademacher +-1/sqrt(d). Block b of parameter `name` (rows [b*R, (b+1)*R)) comes from its own
    generator (seed, name, b), so holding P and regenerating it block by block give the same P."""

    kind = "dense"

    def __init__(self, dim: int, seed: int = 0, hold_limit_bytes: int = HOLD_LIMIT_BYTES):
        super().__init__(dim, seed)
        self.scale = 1.0 / math.sqrt(dim)
        self.hold_limit_bytes = hold_limit_bytes

    def _bound(self) -> None:
        self._rows = max(1, BLOCK_BYTES // (4 * self.dim))
        self.holds = self.input_dim * self.dim * 4 <= self.hold_limit_bytes
        self._held: dict[str, list[torch.Tensor]] = {}
        if self.holds:
            self._held = {name: list(self._blocks(name)) for name, _ in self.layout}

    def _moved(self) -> None:
        self._held = {name: [block.to(self.device) for block in blocks] for name, blocks in self._held.items()}
        self.__dict__.pop("_gram", None)

    def _block(self, name: str, b: int, rows: int) -> torch.Tensor:
        gen = _generator(self.seed, self.kind, name, b)
        signs = torch.empty(rows, self.dim).bernoulli_(0.5, generator=gen)  # drawn on the CPU: one P everywhere
        return signs.mul_(2 * self.scale).sub_(self.scale).to(self.device)

    def _blocks(self, name: str):
        n = self._sizes[name]
        for b, start in enumerate(range(0, n, self._rows)):
            yield self._held[name][b] if name in self._held else self._block(name, b, min(self._rows, n - start))

    def matrix(self, name: str) -> torch.Tensor:
        """P restricted to one parameter, (n_param, d): for tests and small layouts only."""
        return torch.cat(list(self._blocks(name)))

    def add(self, acc: torch.Tensor, name: str, grads: torch.Tensor) -> None:
        self._check(name, grads)
        grads = grads.float()
        for b, block in enumerate(self._blocks(name)):
            start = b * self._rows
            acc.addmm_(grads[:, start:start + block.shape[0]], block)

    def lift_param(self, name: str, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([block @ z for block in self._blocks(name)])

    def col_sq_norms(self, weights: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        # every entry squared is exactly 1/d
        total = self.input_dim if weights is None else sum(float(weights[n].double().sum()) for n, _ in self.layout)
        return torch.full((self.dim,), total * self.scale**2, device=self.device)

    def gram(self, weights: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """P^T W P, accumulated block by block (columns of a dense P are only nearly orthogonal)."""
        if weights is None and hasattr(self, "_gram"):
            return self._gram
        gram = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
        for name, _ in self.layout:
            w = None if weights is None else weights[name].reshape(-1).to(self.device)
            for b, block in enumerate(self._blocks(name)):
                rows = block if w is None else block * w[b * self._rows:b * self._rows + block.shape[0], None]
                gram += (rows.T @ block).double()
        if weights is None:
            self._gram = gram.float()
        return gram.float()


class IdentityProjector(Projector):
    """No projection: d = p and x is the gradient itself."""

    kind = "none"

    def __init__(self, dim: int = 0, seed: int = 0):
        super().__init__(dim, seed)

    def _bound(self) -> None:
        self.dim = self.input_dim
        self._offset, start = {}, 0
        for name, _ in self.layout:
            self._offset[name] = start
            start += self._sizes[name]

    def add(self, acc: torch.Tensor, name: str, grads: torch.Tensor) -> None:
        n = self._check(name, grads)
        acc[:, self._offset[name]:self._offset[name] + n] += grads.float()

    def lift_param(self, name: str, z: torch.Tensor) -> torch.Tensor:
        return z[self._offset[name]:self._offset[name] + self._sizes[name]].clone()

    def col_sq_norms(self, weights: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        if weights is None:
            return torch.ones(self.dim, device=self.device)
        return torch.cat([weights[name].reshape(-1).float().to(self.device) for name, _ in self.layout])

    def project_delta(self, delta: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(delta, dtype=torch.float32).reshape(-1).clone()  # range(P) is everything


class Preconditioned(Projector):
    """x = P^T (s * g): another projector applied to gradients scaled coordinate by coordinate.

    With s = D^(1/2) and D = 1 / (sqrt(v) + eps) the Adam preconditioner (v: second moments of
    the training loss's minibatch gradients at theta*), inner products of x are g^T D h: the
    geometry in which Adam moves, where every coordinate travels at about the same speed whatever
    the size of its gradient. Plain gradients weigh coordinates by gradient size (LoRA's B matrices
    and a few layers dominate) and mis-rank what fine-tuning with Adam will do (docs/method.md).
    lift(z) = s * (P z) is the parameter change; `kind` is the inner projector's.
    """

    def __init__(self, inner: Projector, scales: Mapping[str, torch.Tensor], name: str = "adam"):
        super().__init__(inner.dim, inner.seed)
        self.inner, self.kind, self.scale, self.name = inner, inner.kind, inner.scale, name
        self.scales = {n: torch.as_tensor(t, dtype=torch.float32).reshape(-1) for n, t in scales.items()}

    def _bound(self) -> None:
        if not self.inner.layout:
            self.inner.bind(self.layout)
        elif self.inner.layout != self.layout:
            raise ValueError("Preconditioned: the inner projector is bound to other parameters")
        for name, _ in self.layout:
            if name not in self.scales or self.scales[name].numel() != self._sizes[name]:
                raise ValueError(f"Preconditioned: no scales of the right size for parameter {name!r}")
        self.dim = self.inner.dim
        self._squares = {n: t.square() for n, t in self.scales.items()}

    def _moved(self) -> None:
        self.inner.to(self.device)
        self.scales = {n: t.to(self.device) for n, t in self.scales.items()}
        self._squares = {n: t.to(self.device) for n, t in self._squares.items()}

    def identity(self) -> dict:
        digest = hashlib.sha256()
        for name, _ in self.layout:
            digest.update(name.encode())
            digest.update(self.scales[name].cpu().numpy().tobytes())
        return {**self.inner.identity(), "preconditioner": self.name, "preconditioner_sha256": digest.hexdigest()[:16]}

    def start(self, batch_size: int) -> torch.Tensor:
        return self.inner.start(batch_size)

    def add(self, acc: torch.Tensor, name: str, grads: torch.Tensor) -> None:
        self._check(name, grads)
        self.inner.add(acc, name, grads.float() * self.scales[name])

    def result(self, acc: torch.Tensor) -> torch.Tensor:
        return self.inner.result(acc)

    def lift_param(self, name: str, z: torch.Tensor) -> torch.Tensor:
        return self.inner.lift_param(name, z) * self.scales[name]

    def _weights(self, weights: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """S W S = diag(s^2 w): the inner projector's weights for P^T S W S P."""
        if weights is None:
            return self._squares
        return {n: self._squares[n] * weights[n].reshape(-1) for n in self._squares}

    def col_sq_norms(self, weights: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.inner.col_sq_norms(self._weights(weights))

    def gram(self, weights: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.inner.gram(self._weights(weights))

    def project_delta(self, delta: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection of Delta onto range(S P) (the base class's formula with this gram)."""
        if self.inner.kind == "none":  # S is invertible (every scale > 0): range(S) is everything
            return torch.as_tensor(delta, dtype=torch.float32).reshape(-1).clone()
        return super().project_delta(delta)


KINDS = {"sparse": SparseProjector, "hashed": HashedProjector, "dense": DenseProjector, "none": IdentityProjector}


def make_projector(kind: str, params: nn.Module | Layout | None = None, dim: int = 256, seed: int = 0) -> Projector:
    """A projector of the given kind (sparse | hashed | dense | none), bound to `params` when given: a
    model (its trainable parameters, in trainable() order) or a layout [(name, shape), ...]."""
    if kind not in KINDS:
        raise ValueError(f"gradients.projection: unknown kind {kind!r}; choose one of {sorted(KINDS)}")
    projector = KINDS[kind](dim, seed)
    if isinstance(params, nn.Module):
        params = [(name, tuple(p.shape)) for name, p in params.named_parameters() if p.requires_grad]
    return projector.bind(params) if params is not None else projector
