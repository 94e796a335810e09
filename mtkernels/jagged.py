"""`KeyedJaggedTensor`: a batch of sparse (multi-valued) features, with TorchRec's semantics.

Layout (TorchRec / FBGEMM, feature-major): F keys, batch size B, ``lengths [F*B]`` where
``lengths[f*B + b]`` is the number of ids of feature f in sample b, ``values`` all ids concatenated
in that order, ``offsets [F*B+1]`` the exclusive prefix sum of lengths, optional ``weights``
(one float per value). A torchrec ``KeyedJaggedTensor`` converts with :meth:`from_torchrec`.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch


class KeyedJaggedTensor:
    """A jagged batch of F sparse features over B samples (TorchRec's KeyedJaggedTensor).

    Args:
        keys: feature names, length F.
        values: 1-D int32/int64 ids, all bags concatenated feature-major.
        lengths: optional 1-D ``[F*B]`` bag lengths (int32/int64).
        offsets: optional 1-D ``[F*B+1]`` bag boundaries; one of lengths/offsets is required.
        weights: optional 1-D float ``[len(values)]`` per-value weights.

    Raises:
        ValueError: neither lengths nor offsets given, or sizes that do not agree
            (``len(lengths)`` not a multiple of F, ``offsets[-1] != len(values)``, ...), a negative
            length, decreasing offsets, ``offsets[0] != 0``, or lengths and offsets both given
            that describe different bags.
        TypeError: non-integer values, lengths or offsets.
    """

    def __init__(
        self,
        keys: Sequence[str],
        values: torch.Tensor,
        lengths: Optional[torch.Tensor] = None,
        offsets: Optional[torch.Tensor] = None,
        weights: Optional[torch.Tensor] = None,
    ) -> None:
        self._keys = list(keys)
        if values.dim() != 1:
            raise ValueError(f"values must be 1-D, got shape {tuple(values.shape)}")
        if values.is_floating_point():
            raise TypeError(f"values must hold integer ids, got {values.dtype}")
        if lengths is None and offsets is None:
            raise ValueError("KeyedJaggedTensor needs lengths or offsets")
        for name, t in (("lengths", lengths), ("offsets", offsets)):
            if t is not None and (t.dim() != 1 or t.is_floating_point()):
                raise TypeError(f"{name} must be a 1-D integer tensor, got {t.dtype} {tuple(t.shape)}")
        given_offsets = lengths is None
        if lengths is not None and offsets is not None:
            # both given (TorchRec's KJT carries both): the lookup reads offsets for some feature
            # selections and lengths for others, so they must describe the same bags
            if offsets.numel() != lengths.numel() + 1:
                raise ValueError(
                    f"offsets must have len(lengths)+1={lengths.numel() + 1} entries, got {offsets.numel()}"
                )
            wrong = (offsets[1:] - offsets[:-1] != lengths).nonzero()
            if wrong.numel():
                bag = int(wrong[0, 0])
                raise ValueError(
                    f"offsets and lengths disagree at bag {bag}: lengths[{bag}]={int(lengths[bag])}, "
                    f"offsets[{bag + 1}] - offsets[{bag}]={int(offsets[bag + 1] - offsets[bag])}"
                )
        if lengths is None:
            if offsets.numel() < 1:
                raise ValueError("offsets must hold at least one entry (0)")
            lengths = offsets[1:] - offsets[:-1]
        if offsets is None:
            offsets = torch.zeros(lengths.numel() + 1, dtype=lengths.dtype, device=lengths.device)
            torch.cumsum(lengths, 0, out=offsets[1:])
        if lengths.numel() and bool((lengths < 0).any()):
            raise ValueError(
                "offsets must be non-decreasing" if given_offsets else
                f"lengths must be >= 0, got {int(lengths.min())} (bag {int(torch.argmin(lengths))})"
            )
        if offsets.numel() and int(offsets[0]) != 0:
            raise ValueError(f"offsets[0] must be 0, got {int(offsets[0])}")
        num_keys = len(self._keys)
        if num_keys == 0:
            if lengths.numel() != 0:
                raise ValueError("a KeyedJaggedTensor with no keys must have no lengths")
        elif lengths.numel() % num_keys != 0:
            raise ValueError(
                f"len(lengths)={lengths.numel()} is not a multiple of the {num_keys} keys: "
                "every feature must have the same batch size"
            )
        if int(offsets[-1]) != values.numel():
            raise ValueError(f"offsets[-1]={int(offsets[-1])} must equal len(values)={values.numel()}")
        if weights is not None and weights.numel() != values.numel():
            raise ValueError(f"weights must have len(values)={values.numel()} entries, got {weights.numel()}")
        self._values = values
        self._lengths = lengths
        self._offsets = offsets
        self._weights = weights

    # --- TorchRec-compatible accessors -------------------------------------------------------
    def keys(self) -> List[str]:
        return self._keys

    def values(self) -> torch.Tensor:
        return self._values

    def lengths(self) -> torch.Tensor:
        return self._lengths

    def offsets(self) -> torch.Tensor:
        return self._offsets

    def weights(self) -> torch.Tensor:
        if self._weights is None:
            raise ValueError("this KeyedJaggedTensor has no weights")
        return self._weights

    def weights_or_none(self) -> Optional[torch.Tensor]:
        return self._weights

    def stride(self) -> int:
        """The batch size B."""
        return self._lengths.numel() // len(self._keys) if self._keys else 0

    @property
    def device(self) -> torch.device:
        return self._values.device

    def to(self, device, non_blocking: bool = False) -> "KeyedJaggedTensor":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return KeyedJaggedTensor(
            self._keys, move(self._values), move(self._lengths), move(self._offsets), move(self._weights)
        )

    def __getitem__(self, key: str) -> Dict[str, torch.Tensor]:
        """The ids (and lengths, weights) of one feature: ``{"values", "lengths", "weights"}``.

        Raises:
            KeyError: ``key`` is not one of `keys`.
        """
        if key not in self._keys:
            raise KeyError(f"{key!r} is not a key of this KeyedJaggedTensor; keys: {self._keys}")
        f = self._keys.index(key)
        batch = self.stride()
        start, end = int(self._offsets[f * batch]), int(self._offsets[(f + 1) * batch])
        return {
            "values": self._values[start:end],
            "lengths": self._lengths[f * batch : (f + 1) * batch],
            "weights": None if self._weights is None else self._weights[start:end],
        }

    def to_dict(self) -> Dict[str, Dict[str, torch.Tensor]]:
        return {key: self[key] for key in self._keys}

    # --- constructors -----------------------------------------------------------------------
    @classmethod
    def from_lengths_sync(cls, keys, values, lengths, weights=None) -> "KeyedJaggedTensor":
        return cls(keys, values, lengths=lengths, weights=weights)

    @classmethod
    def from_offsets_sync(cls, keys, values, offsets, weights=None) -> "KeyedJaggedTensor":
        return cls(keys, values, offsets=offsets, weights=weights)

    @classmethod
    def from_dense(cls, features: Dict[str, torch.Tensor]) -> "KeyedJaggedTensor":
        """One id per sample per feature: ``{name: LongTensor [B]}`` -> a KJT with all lengths 1."""
        keys = list(features)
        values = torch.cat([features[k].reshape(-1) for k in keys]) if keys else torch.zeros(0, dtype=torch.long)
        lengths = torch.ones(values.numel(), dtype=torch.long, device=values.device)
        return cls(keys, values, lengths=lengths)

    @classmethod
    def from_torchrec(cls, kjt) -> "KeyedJaggedTensor":
        """Convert a ``torchrec.sparse.jagged_tensor.KeyedJaggedTensor`` (same layout)."""
        return cls(kjt.keys(), kjt.values(), lengths=kjt.lengths(), offsets=kjt.offsets(), weights=kjt.weights_or_none())

    def __repr__(self) -> str:
        return (
            f"KeyedJaggedTensor(keys={self._keys}, batch={self.stride()}, values={self._values.numel()}, "
            f"weighted={self._weights is not None})"
        )
