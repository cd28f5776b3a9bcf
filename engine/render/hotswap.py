"""One LoRA slot in the resident UNet whose weights are replaced in place (diffusers' LoRA hotswap).

``HotswapSlot`` loads a zero LoRA of rank ``rank`` on every module users' LoRAs target, after
``enable_lora_hotswap``: the slot's layers exist from start-up (so a compiled UNet is compiled with
them), its scalings are tensors, and a user's rank-r LoRA (r ≤ rank) is copied into the padded
weights. ``HotswapSlot.pack`` pads a user's LoRA to the slot's shapes once, and ``HotswapSlot.swap_in``
copies it into the slot's tensors with one ``torch._foreach_copy_`` and sets the scalings: no module,
attribute or shape changes, so a UNet under ``torch.compile`` draws the next user without
recompiling. (diffusers' own ``load_lora_adapter(hotswap=True)`` walks the whole UNet and checks
the config on every call: 22 ms against 8 ms for ``set_adapters`` on the tiny SDXL here.) Switching LoRA off stays ``disable_lora`` (the layers' bool, exactly the plain base; a
compiled UNet holds one graph for each state).

What cannot be swapped in is said by ``HotswapSlot.refusal`` before anything is touched (diffusers deletes the
slot when a hotswap fails half-way): text-encoder weights (not supported by diffusers), a rank above
the slot's, modules the slot does not cover, a config peft refuses (dropout, DoRA, rsLoRA, alpha
patterns), or a file without its LoraConfig. The renderer loads those the ordinary way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch

if TYPE_CHECKING:
    from engine.pipelines.base import TextToImagePipeline

_log = logging.getLogger(__name__)

SLOT = "hotswap_slot"
"""The adapter name of the one slot (users' adapter ids are content hashes: no clash)."""

SLOT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""Modules the slot covers: what ``engine.train.lora.LoraTrainSettings.target_modules`` trains."""

_WEIGHT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


class SwapFile(NamedTuple):
    """A user's LoRA read for the slot: the UNet's weights in peft's key format and its LoraConfig."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] | None
    text_encoder_keys: int  # weights for the text encoders, which the slot cannot take


class SlotWeights(NamedTuple):
    """A user's LoRA padded to the slot: one tensor per slot weight, one scaling per slot layer."""

    weights: list[torch.Tensor]
    scalings: list[float]


class HotswapSlot:
    """The slot in ``pipe.unet``: opened once, then users' LoRAs swapped into it.

    ``holder`` is the adapter id whose weights the slot holds now (None: zeros). Not thread-safe:
    the renderer calls it under the lock of the shared modules.
    """

    def __init__(self, pipe: TextToImagePipeline, rank: int, targets: tuple[str, ...] = SLOT_TARGETS) -> None:
        """Load the zero slot adapter of ``rank``: before any other LoRA and before any compile."""
        from peft import LoraConfig

        if rank < 1:
            raise ValueError(f"the hotswap rank must be at least 1, got {rank}")
        self._pipe: Any = cast(Any, pipe)  # diffusers' pipelines are untyped
        unet: Any = self._pipe.unet
        if getattr(unet, "peft_config", None):
            raise RuntimeError("the hotswap slot must be opened before any other LoRA is loaded")
        state_dict: dict[str, torch.Tensor] = {}
        for name, module in unet.named_modules():
            if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith(f".{t}") for t in targets):
                dtype, device = module.weight.dtype, module.weight.device
                state_dict[f"{name}.lora_A.weight"] = torch.zeros(rank, module.in_features, dtype=dtype, device=device)
                state_dict[f"{name}.lora_B.weight"] = torch.zeros(module.out_features, rank, dtype=dtype, device=device)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), lora_dropout=0.0)
        unet.enable_lora_hotswap(target_rank=rank)
        unet.load_lora_adapter(state_dict, prefix=None, adapter_name=SLOT, metadata=config.to_dict())  # type: ignore[no-untyped-call]
        unet.disable_lora()
        self.rank = rank
        self.modules = frozenset(k.rsplit(".lora_", 1)[0] for k in state_dict)
        self._weight_names, self._weights = [], []
        for name, param in unet.named_parameters():
            if f".{SLOT}." in name:
                self._weight_names.append(name.replace(f".{SLOT}.", "."))  # the key in a user's state dict
                self._weights.append(param)
        self._layer_names, self._layers = [], []
        for name, module in unet.named_modules():
            if SLOT in getattr(module, "lora_A", {}):
                self._layer_names.append(name)
                self._layers.append(module)
        self.holder: str | None = None

    def read(self, path: Path) -> SwapFile:
        """The LoRA file at ``path`` as the slot takes it, on the UNet's device and in its dtype."""
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

        pipe = self._pipe
        state_dict, _alphas, metadata = pipe.lora_state_dict(
            str(path), unet_config=pipe.unet.config, return_lora_metadata=True
        )
        unet = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
        if unet and "lora_A" not in next(iter(unet)):
            unet = convert_unet_state_dict_to_peft(unet)  # type: ignore[no-untyped-call]
        unet = {k: v.to(device=pipe.unet.device, dtype=pipe.unet.dtype) for k, v in unet.items()}
        config = None
        if metadata:
            config = {k.removeprefix("unet."): v for k, v in metadata.items() if k.startswith("unet.")} or None
        return SwapFile(unet, config, len(state_dict) - sum(1 for k in state_dict if k.startswith("unet.")))

    def refusal(self, lora: SwapFile) -> str | None:
        """Why ``lora`` cannot go into the slot, or None when it can; touches nothing."""
        from peft import LoraConfig
        from peft.utils.hotswap import check_hotswap_configs_compatible

        if lora.text_encoder_keys:
            return "it has text-encoder weights, which diffusers cannot hotswap"
        if not lora.state_dict:
            return "it has no UNet weights"
        if lora.config is None:
            return "its file carries no LoraConfig"
        if any(not key.endswith(_WEIGHT_SUFFIXES) for key in lora.state_dict):
            return "it is not a plain LoRA (bias, DoRA or other extra weights)"
        rank = max(v.shape[0] for k, v in lora.state_dict.items() if k.endswith(".lora_A.weight"))
        if lora.config.get("use_rslora") or lora.config.get("alpha_pattern"):
            return "its scaling is not lora_alpha / rank (rsLoRA or an alpha pattern)"
        if rank > self.rank:
            return f"its rank {rank} is above the hotswap rank {self.rank}"
        outside = {key.rsplit(".lora_", 1)[0] for key in lora.state_dict} - self.modules
        if outside:
            return f"it targets {len(outside)} modules the slot does not cover"
        try:
            check_hotswap_configs_compatible(self._pipe.unet.peft_config[SLOT], LoraConfig(**lora.config))
        except (TypeError, ValueError) as error:
            return f"its config differs from the slot's ({error})"
        return None

    def pack(self, lora: SwapFile) -> SlotWeights:
        """``lora`` (which ``refusal`` passed) padded with zeros to the slot's rank; modules it does not
        target get zeros. Its scaling is peft's: ``lora_alpha`` over the module's own rank."""
        assert lora.config is not None
        weights = []
        for name, slot_weight in zip(self._weight_names, self._weights, strict=True):
            padded = torch.zeros_like(slot_weight)
            user = lora.state_dict.get(name)
            if user is not None:
                if name.endswith(".lora_A.weight"):
                    padded[: user.shape[0]] = user
                else:
                    padded[:, : user.shape[1]] = user
            weights.append(padded)
        alpha = float(lora.config["lora_alpha"])
        scalings = []
        for name in self._layer_names:
            user_a = lora.state_dict.get(f"{name}.lora_A.weight")
            scalings.append(alpha / user_a.shape[0] if user_a is not None else 0.0)
        return SlotWeights(weights, scalings)

    def swap_in(self, adapter_id: str, packed: SlotWeights) -> None:
        """Copy ``packed`` into the slot's weights and scalings, in place."""
        with torch.no_grad():
            torch._foreach_copy_(self._weights, packed.weights)
            for layer, scaling in zip(self._layers, packed.scalings, strict=True):
                layer.scaling[SLOT].fill_(scaling)
        self.holder = adapter_id

    def clear(self) -> None:
        """Zero the slot's weights (its user's model leaves memory); no recompilation."""
        with torch.no_grad():
            for param in self._weights:
                param.zero_()
        self.holder = None

    def activate(self) -> None:
        """Make the slot the UNet's only active adapter and switch LoRA on, without ``set_adapters``.

        ``set_adapters`` would write the slot's own ``lora_alpha / r`` over the swapped-in user's
        scaling (and replace the scaling tensors by floats, which recompiles).
        """
        for layer in self._layers:
            if layer.active_adapters != [SLOT]:  # another adapter (a fallback) was active last
                layer.set_adapter([SLOT])
        self._pipe.unet.enable_lora()


def compile_unet(pipe: Any, backend: Any = "inductor") -> None:
    """Put ``pipe.unet`` under ``torch.compile`` in place (``Module.compile``: same object, same type).

    In place, so every pipeline over the shared modules draws with it; deep copies (the trainers')
    come out uncompiled.
    """
    _log.info("compiling the resident UNet (backend %s)", backend if isinstance(backend, str) else "custom")
    pipe.unet.compile(backend=backend)
