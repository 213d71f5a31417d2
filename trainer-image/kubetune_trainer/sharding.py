"""Sharded training on PyTorch's own engine: FSDP2 and ``torch.distributed.checkpoint`` (DCP).

``distributed.strategy: fsdp`` (``auto`` for method full) shards parameters, gradients and AdamW
state across every trainer process: each decoder layer is one ``fully_shard`` unit (its
parameters are all-gathered just before its forward and backward and freed after), the root
module holds what is left (embeddings, final norm, output head). On GPU the unsharded copies
are bf16 while the sharded fp32 master weights, the gradient reduction and AdamW stay fp32
(``MixedPrecisionPolicy``); on CPU (gloo) everything is fp32.

Checkpoints of a sharded run are written by every process: ``get_state_dict`` gives each rank's
shards with their global layout (DTensor), ``dcp.async_save`` copies them to CPU memory at once
and writes ``__<rank>_0.distcp`` (rank 0 also ``.metadata``) in a background thread over a
dedicated gloo group, so training goes on meanwhile and never shares a communicator with the
checkpoint. Loading reads whatever pieces of whichever files this rank's shards need, so a
checkpoint saved by N processes resumes on M (2 -> 1, 1 -> 2, ...).

Only the trainable parameters are saved (``ignore_frozen_params``): under LoRA the frozen base
comes from the base model again, as in the unsharded checkpoints.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from kubetune_trainer.errors import ConfigError

log = logging.getLogger("kubetune_trainer.sharding")

MODEL_KEY = "model"
OPTIMIZER_KEY = "optimizer"


def decoder_layers(model) -> list[Any]:
    """The repeated decoder blocks of a transformers model (peft-wrapped or not).

    transformers names them in ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``): the units
    that must never be split across devices are exactly the ones to shard one by one.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(
            f"distributed.strategy fsdp: {type(base).__name__} names no decoder layer class "
            "(_no_split_modules); set distributed.strategy ddp for this model"
        )
    return layers


def mixed_precision(device, amp):
    """bf16/fp16 unsharded parameters with fp32 reduction on GPU; None (all fp32) on CPU."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type != "cuda" or amp is None:
        return None
    return MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32)


def shard_model(model, device, amp) -> int:
    """``fully_shard`` every decoder layer, then the root; returns the number of layer units.

    The root is the outermost module (the PeftModel under LoRA): peft calls its inner model's
    ``forward`` directly, which would bypass a hook placed there.
    """
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision(device, amp)
    kwargs = {"mp_policy": policy} if policy is not None else {}
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, **kwargs)
    # NB: the root is all-gathered for the whole forward anyway; keeping it unsharded after the
    # forward saves one all-gather of embeddings and head per step.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return len(layers)


class GroupPeers:
    """:class:`kubetune_trainer.checkpoints.Peers` over a torch.distributed (gloo) group."""

    def __init__(self, group):
        import torch.distributed as dist

        self.group = group
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def barrier(self) -> None:
        """All ranks meet."""
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's object on rank 0."""
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out


def _options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **extra)


def save_async(model, optimizer, folder: Path, group) -> Future:
    """Start writing this rank's shards of model and optimizer to ``folder``.

    Returns once the state is copied to CPU memory (training may go on); the future completes
    when every rank's files and rank 0's ``.metadata`` are written.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    state = {MODEL_KEY: model_sd, OPTIMIZER_KEY: optim_sd}
    result = dcp.async_save(state, checkpoint_id=str(folder), process_group=group)
    # Newer versions may answer with staging and upload futures; the upload one is what counts.
    return getattr(result, "upload_completion", result)


def saved_parameter_names(folder: Path) -> set[str]:
    """Names of the model parameters a DCP checkpoint holds (read from its .metadata)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(folder)).read_metadata()
    prefix = MODEL_KEY + "."
    return {k[len(prefix) :] for k in metadata.state_dict_metadata if k.startswith(prefix)}


def load(model, optimizer, folder: Path, what: str) -> None:
    """Load a DCP checkpoint into the (sharded) model and, unless None, the optimizer.

    ``what`` names the checkpoint in errors. A checkpoint whose parameters differ from the
    model's (method or targetModules changed) is refused by name, never half-loaded.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    if optimizer is None:
        state = {MODEL_KEY: get_model_state_dict(model, options=_options())}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
        state = {MODEL_KEY: model_sd, OPTIMIZER_KEY: optim_sd}
    saved = saved_parameter_names(folder)
    if saved != set(state[MODEL_KEY]):
        raise ConfigError(
            f"{what} does not match this model (method or targetModules changed?): "
            f"{len(saved ^ set(state[MODEL_KEY]))} parameter names differ"
        )
    dcp.load(state, checkpoint_id=str(folder))
    # strict=False only because the frozen base is not in the checkpoint (checked above).
    options = _options(strict=False)
    if optimizer is None:
        set_model_state_dict(model, state[MODEL_KEY], options=options)
    else:
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state[MODEL_KEY],
            optim_state_dict=state[OPTIMIZER_KEY],
            options=options,
        )


def full_weights(model, trainable_only: bool) -> dict[str, Any]:
    """The unsharded weights on rank 0's CPU (an empty dict elsewhere); every rank must call.

    ``trainable_only`` (LoRA): just the adapter, which is all the artifact publishes.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only
    )
    return get_model_state_dict(model, options=options)


def greedy_decode(model, ids, mask, max_new_tokens: int, eos_token_id: int, pad_token_id: int):
    """Greedy continuation of left-padded prompts, step by step through the sharded model.

    ``generate`` cannot be used on an FSDP model: peft's generate bypasses the root module's
    hooks, and ranks must run exactly the same number of forwards (each one all-gathers). Every
    rank computes the same logits from the same inputs; the "all finished" test is all-reduced
    anyway so that a one-ulp difference between ranks can never desynchronise them.
    """
    import torch
    import torch.distributed as dist

    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
        ).logits
        nxt = logits[:, -1, :].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
        done |= nxt == eos_token_id
        all_done = done.all().to(torch.int32)
        if dist.is_initialized():
            dist.all_reduce(all_done, op=dist.ReduceOp.MIN)
        if bool(all_done):
            break
    return ids
