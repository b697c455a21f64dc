"""AP-MAE: a masked autoencoder over the lower triangle of attention maps.

A ViT masked autoencoder (He et al., MAE) adapted to causal attention maps, as in the paper's
Table 1: a ``W x W`` map is cut into ``P x P`` patches on a ``G x G`` grid (``G = W / P``);
only the ``N = G (G + 1) / 2`` patches on or below the diagonal enter the model (the part above
the diagonal of the diagonal patches is padding).  Half of them are masked; the encoder sees
a CLS token and the visible patches; the decoder sees the encoded visible patches *at their own
positions* and a learned mask token at every masked position (the reference package put mask
tokens on the visible positions, so only its CLS token reached the decoder), and predicts the
pixels of every patch.  The loss is the mean squared error over the masked patches only,
counting only pixels on or below the diagonal of the map.

Input transform (``config.input_scaling``), applied inside the model to the values *as stored*
in ``maps.zarr`` (``config.stored_scaler`` says how capture scaled them):

``log_minmax`` (default)
    The reference package's ``log_normalize`` (:mod:`apmae_gpu.core.scaling`): ln p, then
    ``(x - m) / (-m)`` with ``m`` the map's smallest non-zero log-probability; zero
    probabilities and the upper triangle are 0.  Computed exactly from a ``log`` store (no
    floor), so MSE values compare with the paper's (Table 2, ~7e-3).
``raw``
    The probabilities themselves (``exp`` of a ``log`` store), upper triangle 0: the paper's
    ablation, which does not learn the patterns.

Shapes: ``B`` maps, ``W`` window, ``P`` patch, ``N`` lower-triangle patches, ``K`` visible
patches (``N - round(mask_ratio * N)``), ``D`` encoder width, ``Dd`` decoder width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN

from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.scaling import FLOOR, SCALERS, log_minmax, stored_logs

INPUT_SCALINGS = ("log_minmax", "raw")
POSITION_EMBEDDINGS = ("sincos", "learned")
STORED_SCALERS = SCALERS


# --------------------------------------------------------------------------- config
@strict
class APMAEConfig(PreTrainedConfig):
    """Architecture and input transform of AP-MAE (no run settings: those live in the
    training run's ``training_args.json``).

    ``head_dim`` is the width of one attention head; the attention's inner width is
    ``num_attention_heads * head_dim`` (1024 for the paper: 16 heads x 64, as in the reference
    package), which is what gives the paper's ~101M encoder parameters at width 512.
    """

    model_type = "apmae"

    image_size: int = 256
    patch_size: int = 32
    mask_ratio: float = 0.5
    hidden_size: int = 512
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    head_dim: int = 64
    intermediate_size: int = 2048
    decoder_hidden_size: int = 512
    decoder_num_hidden_layers: int = 8
    decoder_num_attention_heads: int = 8
    decoder_head_dim: int = 64
    decoder_intermediate_size: int = 2048
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    # "sincos": fixed 2-D sine-cosine tables (MAE); "learned": trained, initialised N(0, 1) as
    # the reference's torch.randn.  patch_norm: the reference's patch embedding
    # LayerNorm(P*P) -> Linear -> LayerNorm(D) instead of the Linear alone.  The defaults are
    # what checkpoints written before these keys hold; training's recipe sets all three.
    position_embeddings: str = "sincos"
    patch_norm: bool = False
    initializer_range: float = 0.02
    input_scaling: str = "log_minmax"
    stored_scaler: str = "log"
    log_floor: float = FLOOR    # the store's floor (1e-8 in stores written before FLOOR)
    preset: str = "custom"

    def validate_architecture(self):
        """Reject configs the model cannot be built from (called on construction)."""
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {self.mask_ratio}")
        if self.position_embeddings not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embeddings must be one of {POSITION_EMBEDDINGS}")
        if self.input_scaling not in INPUT_SCALINGS:
            raise ValueError(f"input_scaling must be one of {INPUT_SCALINGS}")
        if self.stored_scaler not in STORED_SCALERS:
            raise ValueError(f"stored_scaler must be one of {STORED_SCALERS}")
        if self.input_scaling == "raw" and self.stored_scaler == "log_normalize":
            raise ValueError("raw input cannot be recovered from log_normalize maps")
        n = self.num_patches
        if not 0 < round(self.mask_ratio * n) < n:
            raise ValueError(f"mask_ratio {self.mask_ratio} leaves no visible or no masked patch")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches on or below the diagonal (36 for 256 / 32)."""
        g = self.grid_size
        return g * (g + 1) // 2


# Presets: ``paper`` is Table 1; ``small`` and ``tiny`` train in minutes on 2 CPU cores.
_PRESETS: dict[str, dict] = {
    "paper": {},
    "small": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, head_dim=32,
                  intermediate_size=1024, decoder_hidden_size=256, decoder_num_hidden_layers=2,
                  decoder_num_attention_heads=8, decoder_head_dim=32,
                  decoder_intermediate_size=1024),
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, head_dim=32,
                 intermediate_size=512, decoder_hidden_size=128, decoder_num_hidden_layers=2,
                 decoder_num_attention_heads=4, decoder_head_dim=32,
                 decoder_intermediate_size=512),
}
PRESETS = tuple(_PRESETS)


def config_fields() -> set[str]:
    """Names a config file or override may set."""
    return {f for f in APMAEConfig.__dataclass_fields__ if not f.startswith("_")} - set(
        PreTrainedConfig.__dataclass_fields__)


def preset_config(name: str, **overrides) -> APMAEConfig:
    """The config of preset ``name`` (``paper`` | ``small`` | ``tiny``), with ``overrides``
    (unknown keys and invalid values raise :class:`ApmaeError`)."""
    if name not in _PRESETS:
        raise ApmaeError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - config_fields())
    if unknown:
        raise ApmaeError(f"unknown AP-MAE config keys: {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(config_fields()))})")
    try:
        return APMAEConfig(**{**_PRESETS[name], "preset": name, **overrides})
    except (StrictDataclassError, TypeError, ValueError) as exc:  # type/validation errors
        raise ApmaeError(f"invalid AP-MAE config: {str(exc).splitlines()[-1].strip()}") from None


# --------------------------------------------------------------------------- geometry helpers
def tril_patch_grid(grid: int) -> torch.Tensor:
    """[N, 2] (row, col) of the patches on or below the diagonal, row-major."""
    return torch.tril_indices(grid, grid).T.contiguous()


def pixel_valid_mask(grid: int, patch: int) -> torch.Tensor:
    """[N, P*P] bool: pixel lies on or below the map's diagonal (False = padding)."""
    rc = tril_patch_grid(grid)
    local = torch.tril(torch.ones(patch, patch, dtype=torch.bool)).flatten()
    valid = torch.ones(len(rc), patch * patch, dtype=torch.bool)
    valid[rc[:, 0] == rc[:, 1]] = local
    return valid


def sincos_2d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Fixed 2-D sine-cosine embedding [len(positions), dim] of (row, col) grid positions
    (half the channels encode the row, half the column, as in MAE)."""
    if dim % 4:
        raise ValueError(f"embedding width {dim} must be a multiple of 4")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def enc(pos):
        angles = pos.double()[:, None] * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([enc(positions[:, 0]), enc(positions[:, 1])], dim=1).float()


def lower_mask(w: int, device=None) -> torch.Tensor:
    """[W, W] bool, True on and below the diagonal."""
    return torch.ones(w, w, dtype=torch.bool, device=device).tril()



# --------------------------------------------------------------------------- blocks
class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int, head_dim: int, qkv_bias: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, dim] -> [B, T, dim]."""
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, H, T, hd]
        return self.proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp: int, config: APMAEConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = Attention(dim, heads, head_dim, config.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(dim, mlp)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


# --------------------------------------------------------------------------- model
class APMAEPreTrainedModel(PreTrainedModel):
    config_class = APMAEConfig
    base_model_prefix = "apmae"
    main_input_name = "maps"

    def _init_weights(self, module):
        """MAE's init: xavier-uniform linears, zero biases, unit norms, N(0, 0.02) tokens,
        fixed sine-cosine position embeddings (frozen), or learned ones drawn N(0, 1) as the
        reference draws them."""
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, APMAEModel):
            std = self.config.initializer_range
            init.normal_(module.cls_token, std=std)
            init.normal_(module.mask_token, std=std)
            g = self.config.grid_size
            rc = tril_patch_grid(g)
            # non-persistent geometry buffers are re-created here after a meta-device load
            init.copy_(module.patch_index, rc[:, 0] * g + rc[:, 1])
            init.copy_(module.pixel_valid, pixel_valid_mask(self.config.grid_size,
                                                            self.config.patch_size))
            for param in (module.pos_embed, module.decoder_pos_embed):
                if self.config.position_embeddings == "learned":
                    init.normal_(param, std=1.0)
                    continue
                table = torch.cat([torch.zeros(1, param.shape[-1]), sincos_2d(param.shape[-1], rc)])
                init.copy_(param, table[None].to(param.dtype))


class APMAEModel(APMAEPreTrainedModel):
    """AP-MAE.  ``model(maps) -> (loss, pred, mask)``; ``model.encode(maps) -> [B, D]``.

    ``maps`` are float tensors ``[B, W, W]`` of stored values (see module docstring).
    """

    def __init__(self, config: APMAEConfig):
        super().__init__(config)
        c = config
        n, pp = c.num_patches, c.patch_size ** 2
        # encoder
        learned = c.position_embeddings == "learned"
        self.patch_embed = nn.Linear(pp, c.hidden_size)
        if c.patch_norm:
            self.patch_norm_in = nn.LayerNorm(pp, eps=c.layer_norm_eps)
            self.patch_norm_out = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, c.hidden_size), requires_grad=learned)
        self.blocks = nn.ModuleList(
            Block(c.hidden_size, c.num_attention_heads, c.head_dim, c.intermediate_size, c)
            for _ in range(c.num_hidden_layers))
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        # decoder
        self.decoder_embed = nn.Linear(c.hidden_size, c.decoder_hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_hidden_size))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, c.decoder_hidden_size),
                                              requires_grad=learned)
        self.decoder_blocks = nn.ModuleList(
            Block(c.decoder_hidden_size, c.decoder_num_attention_heads, c.decoder_head_dim,
                  c.decoder_intermediate_size, c)
            for _ in range(c.decoder_num_hidden_layers))
        self.decoder_norm = nn.LayerNorm(c.decoder_hidden_size, eps=c.layer_norm_eps)
        self.decoder_pred = nn.Linear(c.decoder_hidden_size, pp)
        # geometry (derived from the config, never saved)
        rc = tril_patch_grid(c.grid_size)
        self.register_buffer("patch_index", rc[:, 0] * c.grid_size + rc[:, 1], persistent=False)
        self.register_buffer("pixel_valid", pixel_valid_mask(c.grid_size, c.patch_size),
                             persistent=False)
        self.post_init()

    # ------------------------------------------------------------------ input
    def _check(self, maps: torch.Tensor) -> torch.Tensor:
        c = self.config
        if maps.dim() == 4 and maps.shape[1] == 1:
            maps = maps[:, 0]
        if maps.dim() != 3 or maps.shape[1] != maps.shape[2]:
            raise ApmaeError(f"AP-MAE expects maps [B, W, W], got {tuple(maps.shape)}")
        if maps.shape[-1] != c.image_size:
            raise ApmaeError(f"this AP-MAE takes {c.image_size}x{c.image_size} maps, got "
                             f"{maps.shape[-1]}x{maps.shape[-1]}")
        return maps

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, W, W] -> [B, N, P*P] lower-triangle patches (row-major pixels)."""
        b, g, p = x.shape[0], self.config.grid_size, self.config.patch_size
        grid = x.reshape(b, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(b, g * g, p * p)
        return grid[:, self.patch_index]

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """[B, N, P*P] -> [B, W, W]; upper-triangle patches are 0, padding pixels are kept."""
        b, g, p = patches.shape[0], self.config.grid_size, self.config.patch_size
        grid = patches.new_zeros(b, g * g, p * p)
        grid[:, self.patch_index] = patches
        return grid.reshape(b, g, g, p, p).permute(0, 1, 3, 2, 4).reshape(b, g * p, g * p)

    def prepare(self, maps: torch.Tensor) -> torch.Tensor:
        """Stored maps [B, W, W] -> model input patches [B, N, P*P] float32 (the input
        transform of the module docstring, computed on the lower-triangle patches only;
        padding pixels are 0).  This is also the reconstruction target."""
        c = self.config
        if c.stored_scaler == "log_normalize":   # stored as the model's input already
            return self.patchify(self._check(maps)).float() * self.pixel_valid
        logs, keep = self.patch_logs(maps)
        if c.input_scaling == "raw":
            return torch.where(keep, logs.exp(), torch.zeros_like(logs))
        return log_minmax(logs, keep, dims=(1, 2))

    def patch_logs(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored maps [B, W, W] of a ``log`` or ``none`` store -> (``ln p`` [B, N, P*P]
        float32, mask of the non-zero probabilities within the valid pixels [B, N, P*P])."""
        c = self.config
        x = self.patchify(self._check(maps)).float()
        return stored_logs(x, c.stored_scaler, c.log_floor, self.pixel_valid)

    def transform(self, maps: torch.Tensor) -> torch.Tensor:
        """Stored maps [B, W, W] -> model input as maps [B, W, W] (0 above the diagonal)."""
        return self.unpatchify(self.prepare(maps))

    def mask_from_noise(self, noise: torch.Tensor, mask_ratio: float | None = None) -> torch.Tensor:
        """The mask [B, N] (1 = masked) that ``random_masking`` draws from ``noise`` [B, N]."""
        keep = noise.shape[1] - self.num_masked(mask_ratio)
        rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)
        return (rank >= keep).float()

    # ------------------------------------------------------------------ MAE steps
    def num_masked(self, mask_ratio: float | None = None) -> int:
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        return round(ratio * self.config.num_patches)

    def random_masking(self, x: torch.Tensor, mask_ratio: float,
                       noise: torch.Tensor | None = None):
        """Keep a random subset of tokens per map, by argsort of noise.

        x: [B, N, D]; noise: [B, N] in [0, 1) (the lowest ``K`` values are kept).
        Returns x_visible [B, K, D], mask [B, N] (1 = masked), ids_restore [B, N].
        """
        b, n, d = x.shape
        keep = n - self.num_masked(mask_ratio)
        if noise is None:
            noise = torch.rand(b, n, device=x.device)
        ids_shuffle = torch.argsort(noise.to(x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        x_visible = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, d))
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_visible, mask, ids_restore

    def _encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, T, D] (positions added) -> CLS + tokens through the encoder
        [B, 1+T, D]."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Input patches [B, N, P*P] -> patch tokens with positions [B, N, D]."""
        x = patches.to(self.patch_embed.weight.dtype)
        if self.config.patch_norm:
            x = self.patch_norm_out(self.patch_embed(self.patch_norm_in(x)))
        else:
            x = self.patch_embed(x)
        return x + self.pos_embed[:, 1:]

    def forward_encoder(self, patches: torch.Tensor, mask_ratio: float,
                        noise: torch.Tensor | None = None):
        """Input patches [B, N, P*P] -> latent [B, 1+K, D] (CLS first), mask [B, N],
        ids_restore [B, N]."""
        x = self.embed_patches(patches)
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        return self._encode_tokens(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, 1+K, D] -> predicted pixels of every patch [B, N, P*P].

        The decoder sequence is CLS, then for each of the N positions either that patch's
        encoded token (visible) or the mask token (masked), plus the position embedding.
        """
        x = self.decoder_embed(latent)
        b, k1, dd = x.shape
        n = ids_restore.shape[1]
        mask_tokens = self.mask_token.to(x.dtype).expand(b, n - (k1 - 1), -1)
        shuffled = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [B, N, Dd] in shuffle order
        patches = torch.gather(shuffled, 1, ids_restore[..., None].expand(-1, -1, dd))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                     per_map: bool = False, count_padding: bool = False) -> torch.Tensor:
        """Masked-patch MSE over pixels on or below the diagonal.

        target, pred: [B, N, P*P]; mask: [B, N] (1 = masked).  Per map: sum of squared errors
        over the masked patches' valid pixels / their count.  Returns the mean over maps (a
        scalar), or the per-map values [B] with ``per_map=True``.

        ``count_padding``: the paper's Table 2 definition, every pixel of the masked patches
        in the count, the padding above the diagonal (a known zero, ~10.8% of the masked
        pixels at 256/32) with no error: the same squared errors over a larger count.
        """
        weight = mask.float()[..., None] * self.pixel_valid.float()  # [B, N, P*P]
        sq = (pred.float() - target.float()).square()
        count = (mask.float().sum(1) * weight.shape[-1] if count_padding
                 else weight.sum(dim=(1, 2)))
        mse = (sq * weight).sum(dim=(1, 2)) / count
        return mse if per_map else mse.mean()

    def forward(self, maps: torch.Tensor, mask_ratio: float | None = None,
                noise: torch.Tensor | None = None):
        """maps [B, W, W] (stored values) -> (loss scalar, pred [B, N, P*P], mask [B, N]).

        ``noise`` [B, N] fixes the masks (e.g. to compare models on the same masks).
        """
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        target = self.prepare(maps)
        latent, mask, ids_restore = self.forward_encoder(target, ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(target, pred, mask), pred, mask

    # ------------------------------------------------------------------ embeddings
    def encode(self, maps: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """Embeddings of unmasked maps: stored maps [B, W, W] -> [B, D].

        ``pool="cls"``: the encoder's CLS token (the paper's embedding); ``"mean"``: the mean
        of the patch tokens.  Run it under ``torch.inference_mode()`` for inference.
        """
        if pool not in ("cls", "mean"):
            raise ApmaeError(f"pool must be 'cls' or 'mean', got {pool!r}")
        x = self._encode_tokens(self.embed_patches(self.prepare(maps)))
        return x[:, 0] if pool == "cls" else x[:, 1:].mean(dim=1)


# --------------------------------------------------------------------------- accounting
def parameter_counts(model: APMAEModel) -> dict[str, int]:
    """Trainable parameters of the encoder (patch embedding and its norms, CLS, learned
    positions, blocks, norm) and of the decoder (the rest)."""
    enc = dec = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("patch_embed", "patch_norm", "cls_token", "pos_embed", "blocks",
                            "norm.")):
            enc += p.numel()
        else:
            dec += p.numel()
    return {"encoder": enc, "decoder": dec, "total": enc + dec}


def train_flops_per_map(config: APMAEConfig, mask_ratio: float | None = None) -> float:
    """Analytic FLOPs of one training step per map (forward + backward = 3x forward): matrix
    multiplies of the linear layers and of attention; elementwise work not counted."""
    c = config
    n = c.num_patches
    k = n - round((c.mask_ratio if mask_ratio is None else mask_ratio) * n)
    pp = c.patch_size ** 2

    def block(t, d, h, hd, mlp):
        inner = h * hd
        linear = 2 * t * (d * 3 * inner + inner * d + 2 * d * mlp)
        attention = 2 * 2 * t * t * inner
        return linear + attention

    fwd = 2 * n * pp * c.hidden_size  # patch embedding (all patches, then masked)
    fwd += c.num_hidden_layers * block(k + 1, c.hidden_size, c.num_attention_heads, c.head_dim,
                                       c.intermediate_size)
    fwd += 2 * (k + 1) * c.hidden_size * c.decoder_hidden_size
    fwd += c.decoder_num_hidden_layers * block(n + 1, c.decoder_hidden_size,
                                               c.decoder_num_attention_heads, c.decoder_head_dim,
                                               c.decoder_intermediate_size)
    fwd += 2 * (n + 1) * c.decoder_hidden_size * pp
    return 3.0 * fwd


def describe(config: APMAEConfig) -> str:
    """One line: the preset and its sizes."""
    return (f"{config.preset}: {config.image_size}x{config.image_size}/{config.patch_size} "
            f"({config.num_patches} patches, mask {config.mask_ratio}), encoder "
            f"{config.num_hidden_layers}x{config.hidden_size} ({config.num_attention_heads} heads, "
            f"MLP {config.intermediate_size}), decoder {config.decoder_num_hidden_layers}x"
            f"{config.decoder_hidden_size} ({config.decoder_num_attention_heads} heads), input "
            f"{config.input_scaling} of {config.stored_scaler} maps")


AutoConfig.register("apmae", APMAEConfig)
AutoModel.register(APMAEConfig, APMAEModel)

__all__ = [
    "PRESETS",
    "APMAEConfig",
    "APMAEModel",
    "describe",
    "parameter_counts",
    "pixel_valid_mask",
    "preset_config",
    "sincos_2d",
    "train_flops_per_map",
    "tril_patch_grid",
]
