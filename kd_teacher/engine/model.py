"""Build a Megatron-Core `GPTModel` from a typed `ModelConfig` (the teacher's model config YAML).

The teacher is a Megatron-Core model like any other: this module only translates a small YAML-friendly
dataclass into `TransformerConfig` + layer spec + `GPTModel`, for the current rank's pipeline stage.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F

from kd_teacher.dtypes import DTYPES


@dataclass
class PrecisionConfig:
    """How the model computes: parameter dtype and (optionally) Transformer Engine FP8.

    Field names follow Megatron-Core's `TransformerConfig` (`fp8`, `fp8_recipe`, ...), so that a training
    config's values copy over unchanged.
    """

    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1
    fp8_amax_compute_algo: Literal["most_recent", "max"] = "most_recent"
    fp8_param: bool = False
    first_last_layers_bf16: bool = False
    num_layers_at_start_in_bf16: int = 0
    num_layers_at_end_in_bf16: int = 0


@dataclass
class FusionConfig:
    """The kernel fusions Megatron-LM enables by default for a Transformer Engine run on CUDA.

    `enabled: null` (auto) turns them on where CUDA and Transformer Engine are present and the layer spec is
    `transformer_engine`, and off elsewhere: the local spec on a CPU has none of these kernels. A benchmark's
    baseline must be the student users train, so the GPU presets run with them. The per-fusion switches say
    which ones; Megatron-LM's flags: --no-bias-dropout-fusion, --no-bias-swiglu-fusion, --no-rope-fusion,
    --no-masked-softmax-fusion, --no-persist-layer-norm, --no-gradient-accumulation-fusion, and
    --cross-entropy-loss-fusion with --cross-entropy-fusion-impl (Megatron-LM leaves CE fusion off by default;
    production recipes turn it on: it is the student's fastest CE path that Megatron-Core offers).
    """

    enabled: Optional[bool] = None
    bias_dropout_fusion: bool = True
    bias_activation_fusion: bool = True
    apply_rope_fusion: bool = True
    masked_softmax_fusion: bool = True
    persist_layer_norm: bool = True
    # TE linears add weight gradients straight into Megatron DDP's fp32 main_grad buffers.
    gradient_accumulation_fusion: bool = True
    cross_entropy_loss_fusion: bool = True
    cross_entropy_fusion_impl: Literal["native", "te"] = "native"


def _te_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


@dataclass
class MoEConfig:
    """Mixture-of-experts MLPs: Megatron-Core's `MoELayer` (router, experts, token dispatcher).

    Field names follow `TransformerConfig`'s `moe_*` settings without the prefix.
    """

    num_experts: int
    router_topk: int
    ffn_hidden_size: int
    # Which layers have experts: 1 every layer, N every N-th (from layer 0), or a 0/1 entry per layer.
    layer_freq: Union[int, list[int]] = 1
    # True: softmax over all experts, then the top-k (weights not renormalised); False: top-k of the logits,
    # then softmax over those k (the same as renormalising the full softmax's top-k).
    router_pre_softmax: bool = False
    token_dispatcher_type: Literal["alltoall", "allgather"] = "alltoall"
    # None: Transformer Engine's grouped GEMM under the TE spec, one MLP per expert (SequentialMLP) under
    # the local spec (grouped GEMM needs TE or cutlass kernels).
    grouped_gemm: Optional[bool] = None
    # Token dropping: with a capacity factor an expert takes at most capacity x its even share of a batch's
    # tokens and drops the rest, so a token's output depends on what else is in its batch. None: dropless.
    # The engine refuses to serve a dropping teacher unless `engine.accept_moe_token_dropping`.
    expert_capacity_factor: Optional[float] = None
    token_drop_policy: Literal["probs", "position"] = "probs"
    pad_expert_input_to_capacity: bool = False

    def __post_init__(self):
        if not 1 <= self.router_topk <= self.num_experts:
            raise ValueError(f"moe.router_topk {self.router_topk} must be in [1, num_experts={self.num_experts}]")


@dataclass
class ModelConfig:
    """A GPT model as Megatron-Core builds it. `vocab_size` is the true (tokenizer) vocabulary."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    max_sequence_length: int
    num_query_groups: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    # Per-head dimension; None: hidden_size / num_attention_heads (Qwen3 and Mistral-Nemo set their own).
    kv_channels: Optional[int] = None
    normalization: Literal["LayerNorm", "RMSNorm"] = "RMSNorm"
    layernorm_epsilon: float = 1e-5
    activation: Literal["gelu", "swiglu"] = "swiglu"
    qk_layernorm: bool = False  # a norm over each query and key head before RoPE (Qwen3)
    add_qkv_bias: bool = False  # biases on the query/key/value projections only (Qwen2)
    position_embedding_type: Literal["rope", "learned_absolute"] = "rope"
    rotary_base: Union[int, float] = 10000
    # Llama 3.x RoPE frequency scaling (Megatron-Core's `rope_scaling`: low/high frequency factors 1 and 4,
    # original context 8192) with this factor; None: none.
    rope_scaling_factor: Optional[float] = None
    # Linear RoPE scaling: positions divided by this factor; None: none.
    rotary_seq_len_interpolation_factor: Optional[float] = None
    share_embeddings_and_output_weights: bool = False
    make_vocab_size_divisible_by: int = 128
    layer_spec: Literal["local", "transformer_engine"] = "local"
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # MoE layers only: experts split over EP ranks, each expert's MLP over expert-TP ranks (None: TP).
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    seed: int = 1234
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    fusions: FusionConfig = field(default_factory=FusionConfig)
    moe: Optional[MoEConfig] = None

    def __post_init__(self):
        if self.vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
                " (set kv_channels for a head dimension of its own)"
            )
        if self.moe is None and (self.expert_model_parallel_size != 1 or self.expert_tensor_parallel_size):
            raise ValueError("expert_model_parallel_size / expert_tensor_parallel_size need a `moe:` section")
        if self.moe is not None and self.tensor_model_parallel_size > 1 and not self.sequence_parallel:
            raise ValueError("a MoE model with tensor_model_parallel_size > 1 needs sequence_parallel: true "
                             "(Megatron-Core's MoE layer refuses TP without it in a training forward)")
        if self.moe is not None and self.moe.num_experts % self.expert_model_parallel_size:
            raise ValueError(f"moe.num_experts {self.moe.num_experts} is not divisible by "
                             f"expert_model_parallel_size {self.expert_model_parallel_size}")

    def fusions_active(self) -> bool:
        """Whether `fusions` apply to this model here (see `FusionConfig`); raises where asked for and impossible."""
        want = self.fusions.enabled
        if want is None:
            return self.layer_spec == "transformer_engine" and torch.cuda.is_available() and _te_installed()
        if want and self.layer_spec != "transformer_engine":
            raise ValueError("fusions.enabled: true needs layer_spec: transformer_engine (the fused kernels are "
                             "Transformer Engine's and Megatron's CUDA ones); set fusions.enabled: false or null")
        if want and not torch.cuda.is_available():
            raise ValueError("fusions.enabled: true needs CUDA; set fusions.enabled: false or null on a CPU")
        return bool(want)

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, self.tensor_model_parallel_size)


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding rule: round up to a multiple of `make_vocab_size_divisible_by * TP`."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def init_model_parallel(cfg: ModelConfig) -> None:
    """torch.distributed and Megatron-Core's parallel groups for `cfg`'s layout (TP, PP and, for MoE, EP/ETP)."""
    from kd_teacher.runtime import init_distributed

    init_distributed(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.seed,
                     ep=cfg.expert_model_parallel_size, etp=cfg.expert_tensor_parallel_size)


def transformer_config(cfg: ModelConfig):
    """The Megatron-Core `TransformerConfig` for `cfg` in the current parallel layout."""
    from megatron.core.transformer import TransformerConfig

    p = cfg.precision
    dtype = DTYPES[p.params_dtype]
    swiglu = cfg.activation == "swiglu"
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.kv_channels,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.layernorm_epsilon,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        add_bias_linear=False,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        expert_model_parallel_size=cfg.expert_model_parallel_size,
        expert_tensor_parallel_size=cfg.expert_tensor_parallel_size,
        sequence_parallel=cfg.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # CPU initialisation builds the full master weight from the default generator and splits it, so
        # a model is the same whatever the TP size; it is also the only path that works without CUDA.
        use_cpu_initialization=True,
        **_fusion_kwargs(cfg, dtype),
    )
    if cfg.moe is not None:
        kwargs.update(_moe_kwargs(cfg))
    if p.fp8 is not None:
        kwargs.update(
            fp8=p.fp8,
            fp8_recipe=p.fp8_recipe,
            fp8_margin=p.fp8_margin,
            fp8_amax_history_len=p.fp8_amax_history_len,
            fp8_amax_compute_algo=p.fp8_amax_compute_algo,
            fp8_param=p.fp8_param,
            first_last_layers_bf16=p.first_last_layers_bf16,
            num_layers_at_start_in_bf16=p.num_layers_at_start_in_bf16,
            num_layers_at_end_in_bf16=p.num_layers_at_end_in_bf16,
        )
    return TransformerConfig(**kwargs)


def _fusion_kwargs(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """TransformerConfig's fusion fields: Megatron-LM's defaults where `cfg.fusions_active()`, all off elsewhere."""
    names = ("bias_dropout_fusion", "bias_activation_fusion", "apply_rope_fusion", "masked_softmax_fusion",
             "persist_layer_norm", "gradient_accumulation_fusion", "cross_entropy_loss_fusion")
    if not cfg.fusions_active():
        return {name: False for name in names}
    f = cfg.fusions
    kwargs = {name: bool(getattr(f, name)) for name in names}
    # Megatron-LM turns rope fusion off for other position embeddings (arguments.py), and Megatron-Core's
    # native fused CE hard-codes a bf16 gradient: it is only right for a bf16 model.
    kwargs["apply_rope_fusion"] &= cfg.position_embedding_type == "rope"
    # The output layer is Megatron's own ColumnParallelLinear, whose fused weight-gradient accumulation needs
    # APEX's fused_weight_gradient_mlp_cuda (GPTModel refuses to build without it): Megatron-LM runs without
    # APEX need --no-gradient-accumulation-fusion, so the fusion is on only where the extension is installed.
    kwargs["gradient_accumulation_fusion"] &= importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
    # Megatron-LM: bias_swiglu_fusion for SwiGLU; bias_gelu_fusion is turned off where linears have no bias.
    kwargs["bias_activation_fusion"] &= cfg.activation == "swiglu"
    kwargs["cross_entropy_loss_fusion"] &= dtype == torch.bfloat16
    kwargs["cross_entropy_fusion_impl"] = f.cross_entropy_fusion_impl
    return kwargs


def _moe_kwargs(cfg: ModelConfig) -> dict:
    moe = cfg.moe
    grouped = moe.grouped_gemm if moe.grouped_gemm is not None else cfg.layer_spec == "transformer_engine"
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.router_topk,
        moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_layer_freq=moe.layer_freq,
        moe_router_pre_softmax=moe.router_pre_softmax,
        moe_router_score_function="softmax",
        moe_token_dispatcher_type=moe.token_dispatcher_type,
        moe_grouped_gemm=grouped,
        moe_expert_capacity_factor=moe.expert_capacity_factor,
        moe_token_drop_policy=moe.token_drop_policy,
        moe_pad_expert_input_to_capacity=moe.pad_expert_input_to_capacity,
        # A teacher is never trained: no load-balancing loss (it does not change the forward's values).
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
    )


def layer_spec(cfg: ModelConfig, config=None):
    """The decoder's layer spec (dense models) or block spec (MoE: dense and expert layers per `moe.layer_freq`)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    te = cfg.layer_spec == "transformer_engine"
    if te:
        try:
            import transformer_engine  # noqa: F401
        except ImportError as e:
            raise RuntimeError(
                "layer_spec: transformer_engine needs Transformer Engine, which is not installed "
                "(pip install 'kd-teacher[te]' on a CUDA machine)"
            ) from e
    if cfg.moe is not None:
        config = config if config is not None else transformer_config(cfg)
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=te, normalization=cfg.normalization)
    elif te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(normalization=cfg.normalization, qk_layernorm=cfg.qk_layernorm)
    if cfg.sequence_parallel and not te:
        return _sequence_parallel_local_block(spec, config if config is not None else transformer_config(cfg))
    return spec


class SequenceParallelTorchNorm:
    """torch LayerNorm / RMSNorm usable under sequence parallelism, for the local (non-TE) layer spec.

    Megatron's WrappedTorchNorm refuses sequence parallelism because nothing marks its weights: each TP rank
    then sees only its slice of the sequence, so the norm's weight gradients are partial sums that
    `finalize_model_grads` must all-reduce over the TP group, which it does for parameters carrying
    `sequence_parallel = True` (as Transformer Engine's norms set it). This sets it; the math is torch's.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norms:
            raise ValueError(f"normalization {config.normalization!r} is not supported with the local spec")
        norm = norms[config.normalization](hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm


def _sequence_parallel_local_block(spec, config):
    """The local spec's transformer block (from a layer spec or a block spec) with every torch norm swapped for
    `SequenceParallelTorchNorm`."""
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    def swap(node):
        if node is WrappedTorchNorm:
            return SequenceParallelTorchNorm
        if isinstance(node, ModuleSpec):
            return dataclasses.replace(node, module=swap(node.module), submodules=swap(node.submodules))
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            return dataclasses.replace(node, **{f.name: swap(getattr(node, f.name)) for f in dataclasses.fields(node)
                                                if f.init})
        return node

    if isinstance(spec, TransformerBlockSubmodules):
        block = dataclasses.replace(spec, layer_specs=[swap(layer) for layer in spec.layer_specs],
                                    layer_norm=SequenceParallelTorchNorm)
    else:
        block = TransformerBlockSubmodules(layer_specs=[swap(spec)] * get_num_layers_to_build(config),
                                           layer_norm=SequenceParallelTorchNorm)
    return ModuleSpec(module=TransformerBlock, submodules=block)


def build_gpt_model(cfg: ModelConfig, config=None):
    """Build this rank's pipeline stage of the GPT model described by `cfg` (parallel_state initialised).

    Returns `(model, transformer_config)`. The model stays on the CPU where CUDA is absent and moves to the
    current CUDA device otherwise.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    want_etp = cfg.expert_tensor_parallel_size or cfg.tensor_model_parallel_size
    if (tp, pp) != (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size) or (
        cfg.moe is not None and (ep, etp) != (cfg.expert_model_parallel_size, want_etp)
    ):
        raise ValueError(
            f"model config asks for TP={cfg.tensor_model_parallel_size}, PP={cfg.pipeline_model_parallel_size}"
            + (f", EP={cfg.expert_model_parallel_size}, expert TP={want_etp}" if cfg.moe is not None else "")
            + f" but parallel_state is initialised with TP={tp}, PP={pp}"
            + (f", EP={ep}, expert TP={etp}" if cfg.moe is not None else "")
        )
    if config is None:
        config = transformer_config(cfg)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(cfg, config),
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
        position_embedding_type=cfg.position_embedding_type,
        rotary_base=cfg.rotary_base,
        rope_scaling=cfg.rope_scaling_factor is not None,
        rope_scaling_factor=cfg.rope_scaling_factor or 8.0,
        seq_len_interpolation_factor=cfg.rotary_seq_len_interpolation_factor,
        parallel_output=True,
    )
    if torch.cuda.is_available():
        model = model.cuda(torch.cuda.current_device())
    return model, config
