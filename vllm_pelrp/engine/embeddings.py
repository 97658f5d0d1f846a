"""Embedding blocks: how token ids (and positions) become the first layer's input, and how the
relevance at that input splits among the embedding's parts.

- ``TokenEmbedding``: E[token] × scale (Gemma: √hidden). Positions enter later, in the
  attention (RoPE), so all relevance at the input is the token's: R = Σ_d x ⊙ ∂x.
- ``PatchEmbedding`` (ViT, DeiT): an image cut into p×p patches, each embedded by the patch
  projection (a conv with kernel = stride = p: a linear map on the flattened patch), a class
  token in front, and the learned position table added to all of them. The ε-rule on the
  projection gives each pixel x ⊙ (Wᵀ g) and the bias its share; a patch's relevance is the
  sum over its pixels, the class token's is cls ⊙ g, and the positional relevance P ⊙ g per
  patch position, as a grid (``PatchEmbedding.grid``).
- ``AdditiveEmbedding``: x = E[token] + P[position] (+ T[token type]), optionally followed by a
  LayerNorm (BERT). P is a learned table (BERT, GPT-2, RoBERTa with its offset) or a fixed
  sinusoidal one (``kind="absolute"``). The ε-rule on the sum is exact in gradient×input form:
  R(E) = E ⊙ g, R(P) = P ⊙ g, R(T) = T ⊙ g. In ``pa-lrp`` each is booked apart (token,
  positional, token-type relevance); in the other modes all of R(x) is the token's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .blocks import LayerNorm
from .rules import additive_embedding_rule

POSITION_KINDS = ("learned", "absolute")


@dataclass
class InputRelevance:
    """The relevance of an embedding's parts per target row, (B, T) each: ``position`` and
    ``token_type`` None where the embedding has none; ``kept`` (B,): what its norm's β or its
    projection's bias keeps (None without); ``pixel`` (B, C, H, W): an image's pixels."""

    token: Tensor
    position: Tensor | None = None
    token_type: Tensor | None = None
    kept: Tensor | None = None
    pixel: Tensor | None = None


class TokenEmbedding:
    """E[token] × ``scale`` (in the weights' dtype, as HF and vLLM compute it)."""

    position_kind = None

    def __init__(self, table: Tensor, scale: float = 1.0) -> None:
        self.table, self.scale = table, scale

    def forward(self, input_ids: Tensor, positions: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> tuple[Tensor, None]:
        embedded = self.table[input_ids.to(self.table.device)]
        if self.scale != 1.0:
            embedded = embedded * torch.tensor(self.scale, dtype=embedded.dtype)
        return embedded, None

    def relevance(self, grad: Tensor, layer_input: Tensor, cache: None, mode: str
                  ) -> InputRelevance:
        """From the gradient at the first layer's input (B, T, hidden) and that input."""
        return InputRelevance((layer_input.float() * grad).sum(-1))


def sinusoidal_positions(num_positions: int, dim: int, base: float = 10000.0,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """Fixed absolute table (Vaswani et al.): P[t, 2i] = sin(t/base^(2i/d)), P[t, 2i+1] = cos(…)."""
    positions = torch.arange(num_positions, dtype=torch.float64)[:, None]
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(num_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(positions * inv_freq)
    table[:, 1::2] = torch.cos(positions * inv_freq)[:, : dim // 2]
    return table.to(dtype)


@dataclass
class EmbeddingParts:
    """The addends of the first layer's input, each (T, hidden); ``token_type`` None without."""

    word: Tensor
    position: Tensor
    token_type: Tensor | None

    def total(self) -> Tensor:
        """x = E + T + P in HF's order (BERT adds the token type first)."""
        total = self.word if self.token_type is None else self.word + self.token_type
        return total + self.position


@dataclass
class AdditiveEmbeddingCache:
    parts: EmbeddingParts
    inv_std: Tensor | None  # of the embedding's LayerNorm


class AdditiveEmbedding:
    """Word + position (+ token type) embeddings, then an optional LayerNorm. Position t reads
    row t + ``position_offset`` of the table by default; a table of None is the sinusoidal one,
    computed (``kind="absolute"`` only)."""

    def __init__(self, word: Tensor, position: Tensor | None, *, kind: str = "learned",
                 position_offset: int = 0, token_type: Tensor | None = None,
                 norm: LayerNorm | None = None) -> None:
        if kind not in POSITION_KINDS:
            raise ValueError(f"position kind {kind!r}; allowed: {', '.join(POSITION_KINDS)}")
        self.word, self.position, self.token_type, self.norm = word, position, token_type, norm
        self.position_kind, self.position_offset = kind, position_offset

    def default_positions(self, length: int, device=None) -> Tensor:
        """Table rows of positions 0…T−1: ``arange(T) + position_offset``."""
        return torch.arange(length, device=device) + self.position_offset

    def parts(self, input_ids: Tensor, positions: Tensor | None = None,
              token_type_ids: Tensor | None = None) -> EmbeddingParts:
        """Look up the addends, checking every index (a ``ValueError`` names what is allowed)."""
        device = self.word.device
        input_ids = torch.as_tensor(input_ids, device=device)
        if input_ids.dim() != 1 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be one non-empty sequence (T,), got shape "
                             f"{tuple(input_ids.shape)}")
        length = input_ids.shape[0]
        vocab = self.word.shape[0]
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab})")
        positions = (self.default_positions(length, device) if positions is None
                     else torch.as_tensor(positions, device=device))
        if positions.shape != (length,):
            raise ValueError(f"positions must have shape ({length},), got "
                             f"{tuple(positions.shape)}")
        table = self.position
        if table is None:
            if self.position_kind != "absolute":
                raise ValueError("learned positions need the position table in the weights")
            table = sinusoidal_positions(int(positions.max()) + 1, self.word.shape[1],
                                         dtype=self.word.dtype).to(device)
        elif int(positions.max()) >= table.shape[0] or int(positions.min()) < 0:
            usable = table.shape[0] - self.position_offset
            raise ValueError(f"{length} tokens exceed the model's {usable} positions")
        token_type = None
        if self.token_type is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(length, dtype=torch.long, device=device)
            token_type_ids = torch.as_tensor(token_type_ids, device=device)
            if token_type_ids.shape != (length,):
                raise ValueError(f"token_type_ids must have shape ({length},), got "
                                 f"{tuple(token_type_ids.shape)}")
            types = self.token_type.shape[0]
            if int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= types:
                raise ValueError(f"token type ids must lie in [0, {types})")
            token_type = self.token_type[token_type_ids]
        elif token_type_ids is not None and bool((torch.as_tensor(token_type_ids) != 0).any()):
            raise ValueError("this model has no token-type embedding; token_type_ids must be 0")
        return EmbeddingParts(self.word[input_ids], table[positions], token_type)

    def forward(self, input_ids: Tensor, positions: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> tuple[Tensor, AdditiveEmbeddingCache]:
        parts = self.parts(input_ids, positions, token_type_ids)
        embedded, inv_std = parts.total(), None
        if self.norm is not None:
            embedded, inv_std = self.norm.forward(embedded)
        return embedded, AdditiveEmbeddingCache(parts, inv_std)

    def relevance(self, grad: Tensor, layer_input: Tensor, cache: AdditiveEmbeddingCache,
                  mode: str) -> InputRelevance:
        if cache is None:
            raise ValueError("an additive embedding's relevance needs its forward (the parts)")
        kept = torch.zeros(grad.shape[0], device=grad.device)
        if self.norm is not None:
            grad = self.norm.backward(grad, cache.inv_std, kept)
        parts = cache.parts
        word, position, token_type = additive_embedding_rule(grad, parts.word, parts.position,
                                                             parts.token_type)
        if mode != "pa-lrp":  # all of R(x_t) is the token's
            word = word + position if token_type is None else word + position + token_type
            position = torch.zeros_like(word)
            token_type = None if token_type is None else torch.zeros_like(word)
        return InputRelevance(word, position, token_type, kept)


@dataclass
class PatchEmbeddingCache:
    patches: Tensor  # (N, C·p·p): the flattened patches, in the projection's order
    image_shape: tuple[int, ...]
    position: Tensor  # (1 + N, hidden): the position table's rows
    inv_std: Tensor | None = None  # of the LayerNorm after the sum (CLIP), if any


class PatchEmbedding:
    """A ViT's input: ``projection`` (hidden, C, p, p) and its bias, the class token (hidden,),
    the learned position table (1 + N, hidden) for an ``image_size`` image, and an optional
    LayerNorm on the sum (CLIP's ``pre_layrnorm``: its β keeps its share). Token 0 is the class
    token, tokens 1…N the patches in row-major order; with a distillation token (DeiT) that is
    token 1 and the patches follow; without a class token (``None``, SigLIP) the table has N rows
    and token n is patch n. Another image size would need the table
    interpolated: refused (``ValueError`` naming the size the model takes)."""

    position_kind = "learned"

    def __init__(self, projection: Tensor, bias: Tensor | None, class_token: Tensor | None,
                 position: Tensor, image_size: tuple[int, int],
                 norm: LayerNorm | None = None, distillation_token: Tensor | None = None) -> None:
        self.norm = norm
        self.hidden, self.channels, self.patch = projection.shape[0], projection.shape[1], \
            projection.shape[2]
        if projection.shape[2] != projection.shape[3]:
            raise ValueError(f"square patches only, got {tuple(projection.shape[2:])}")
        self.weight = projection.reshape(self.hidden, -1)
        self.bias, self.position = bias, position
        if distillation_token is not None and class_token is None:
            raise ValueError("a distillation token comes after a class token")
        tokens = [t.reshape(-1) for t in (class_token, distillation_token) if t is not None]
        # the tokens before the patches, (prefix, hidden): the class token, the distillation one
        self.prefix_tokens = torch.stack(tokens) if tokens else None
        self.prefix = len(tokens)
        self.image_size = tuple(image_size)
        self.grid_shape = (self.image_size[0] // self.patch, self.image_size[1] // self.patch)
        patches = self.grid_shape[0] * self.grid_shape[1]
        if position.shape[0] != self.prefix + patches:
            raise ValueError(f"a position table of {position.shape[0]} rows for {patches} "
                             f"patches{' and the class token' if self.prefix else ''}")

    def flatten(self, pixels: Tensor) -> Tensor:
        """(C, H, W) → (N, C·p·p), patch n = row n // w, column n % w of the grid."""
        p = self.patch
        channels, height, width = pixels.shape
        return (pixels.unfold(1, p, p).unfold(2, p, p)  # (C, h, w, p, p)
                .permute(1, 2, 0, 3, 4).reshape(-1, channels * p * p))

    def forward(self, pixels: Tensor, positions: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> tuple[Tensor, PatchEmbeddingCache]:
        pixels = torch.as_tensor(pixels, device=self.weight.device)
        expected = (self.channels, *self.image_size)
        if pixels.shape != expected:
            raise ValueError(f"an image of shape {tuple(pixels.shape)}; this model takes "
                             f"{expected} (channels, height, width): resize it, position "
                             "tables are not interpolated")
        if positions is not None or token_type_ids is not None:
            raise ValueError("a ViT's positions are its patches' places; nothing to override")
        patches = self.flatten(pixels.to(self.weight.dtype))
        embedded = patches @ self.weight.T
        if self.bias is not None:
            embedded = embedded + self.bias
        if self.prefix_tokens is not None:
            embedded = torch.cat([self.prefix_tokens.to(embedded.dtype), embedded])
        tokens = embedded + self.position
        cache = PatchEmbeddingCache(patches, tuple(pixels.shape), self.position)
        if self.norm is not None:
            tokens, cache.inv_std = self.norm.forward(tokens)
        return tokens, cache

    def relevance(self, grad: Tensor, layer_input: Tensor, cache: PatchEmbeddingCache,
                  mode: str) -> InputRelevance:
        if cache is None:
            raise ValueError("a patch embedding's relevance needs its forward (the patches)")
        rows = grad.shape[0]
        kept = torch.zeros(rows, device=grad.device)
        if self.norm is not None:
            grad = self.norm.backward(grad, cache.inv_std, kept)
        position = (cache.position.float() * grad).sum(-1)  # (B, prefix + N)
        grad_patches = grad[:, self.prefix:]  # the projection's output, (B, N, hidden)
        if self.bias is not None:
            kept += (grad_patches * self.bias.float()).sum((1, 2))
        pixel_flat = cache.patches.float() * (grad_patches @ self.weight.float())  # (B, N, Cpp)
        token = pixel_flat.sum(-1)
        if self.prefix_tokens is not None:
            prefix = (self.prefix_tokens.float() * grad[:, :self.prefix]).sum(-1)  # (B, prefix)
            token = torch.cat([prefix, token], dim=1)
        if mode != "pa-lrp":  # all of R(x_t) is the token's (the bias keeps its share)
            token, position = token + position, torch.zeros_like(position)
        p, (h, w) = self.patch, self.grid_shape
        pixel = (pixel_flat.reshape(rows, h, w, self.channels, p, p)
                 .permute(0, 3, 1, 4, 2, 5).reshape(rows, self.channels, h * p, w * p))
        return InputRelevance(token, position, None, kept, pixel)

    def grid(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token values (..., prefix + N) → (the class token's (...), None without one; the
        patches' (..., h, w))."""
        first = values[..., 0] if self.prefix else None
        return first, values[..., self.prefix:].reshape(*values.shape[:-1], *self.grid_shape)
