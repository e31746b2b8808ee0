"""torchvision backbones as feature extractors, for transfer-learning profiles (Pawlowski et al.).

``create_model(name, weights=None)`` for ``resnet18, resnet50, vgg16, inception_v3,
convnext_tiny, vit_b_16`` gives a :class:`Backbone`: ``forward(x (B, 3, H, W))`` with
``x`` float and ImageNet-normalised (mean 0.485/0.456/0.406, std 0.229/0.224/0.225) ->
features (B, D), the network cut before its classification layer (the penultimate
layer is the embedding, as in the paper). Attributes ``feature_dim`` (D) and
``input_size`` (the side the network was trained on: 224, or 299 for inception_v3).

Where the cut is: resnets and inception_v3 -> global-average-pooled features (512 /
2048 / 2048); vgg16 -> fc7 after its ReLU (4096); convnext_tiny -> the normalised pooled
features before the last Linear (768); vit_b_16 -> the class token after the encoder's
final LayerNorm (768). vit_b_16 only takes 224x224: other sizes are resized
(bilinear) inside ``forward``.

Weights: never downloaded (torchvision ``weights=None``). ``weights`` is a local path
or fsspec URI (``s3://...``) of a torchvision **state dict** of the full classifier, as
published by torchvision (e.g. ``resnet18-f37072fd.pth``; on a machine with internet:
``torchvision.models.resnet18(weights="IMAGENET1K_V1").state_dict()`` then
``torch.save``), read with ``torch.load(weights_only=True)``. inception_v3 with
weights switches on torchvision's ``transform_input`` (its ImageNet weights expect
Google's [-1, 1] scaling; torchvision does the same when it loads them).
:func:`save_backbone_weights` writes a randomly initialised one (tests, docs).

Without ``weights`` the initialisation is random but **seeded** (``RANDOM_INIT_SEED``, or
``seed``): every profiling actor of a pool, an actor Ray restarts, and a rerun that resumes
a half-written store must all embed fields with the same network, or one screen's
profiles would come from several unrelated networks.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    feature_dim: int
    input_size: int
    build: Callable[..., nn.Module]  # torchvision builder, weights=None


def _tv():
    import torchvision.models as tvm

    return tvm


SPECS: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(512, 224, lambda **kw: _tv().resnet18(weights=None, **kw)),
    "resnet50": BackboneSpec(2048, 224, lambda **kw: _tv().resnet50(weights=None, **kw)),
    "vgg16": BackboneSpec(4096, 224, lambda **kw: _tv().vgg16(weights=None, **kw)),
    "inception_v3": BackboneSpec(2048, 299, lambda **kw: _tv().inception_v3(weights=None, **kw)),
    "convnext_tiny": BackboneSpec(768, 224, lambda **kw: _tv().convnext_tiny(weights=None, **kw)),
    "vit_b_16": BackboneSpec(768, 224, lambda **kw: _tv().vit_b_16(weights=None, **kw)),
}


def _spec(name: str) -> BackboneSpec:
    if name not in SPECS:
        raise KeyError(f"unknown backbone {name!r}; expected one of: {', '.join(sorted(SPECS))}")
    return SPECS[name]


def read_state_dict(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a local path or fsspec URI, read with ``weights_only=True``.

    Accepts a bare state dict or a dict holding one under ``state_dict`` / ``model``."""
    import fsspec

    from ..store.errors import RayscreenError

    try:
        with fsspec.open(str(uri), "rb", **(storage_options or {})) as f:
            blob = f.read()
    except FileNotFoundError:
        raise RayscreenError(f"backbone weights {uri}: file not found (weights are never downloaded; "
                             "save a torchvision state dict there, see rayscreen.models.backbones)") from None
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused or garbled file
        raise RayscreenError(f"backbone weights {uri}: not a tensors-only torch state dict ({e})") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RayscreenError(f"backbone weights {uri}: expected a dict of tensors (a state dict)")
    return state


RANDOM_INIT_SEED = 0


def _torchvision_model(name: str, weights: str | None, storage_options: dict[str, Any] | None,
                       seed: int = RANDOM_INIT_SEED) -> nn.Module:
    """The full torchvision classifier, with ``weights`` loaded strictly, or initialised from ``seed``."""
    from ..store.errors import RayscreenError

    spec = _spec(name)
    kw: dict[str, Any] = {}
    if name == "inception_v3":
        # aux head kept so torchvision's published state dict loads strictly; dropped after
        kw = dict(aux_logits=True, init_weights=weights is None, transform_input=weights is not None)
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        model = spec.build(**kw)
    if weights is not None:
        state = read_state_dict(weights, storage_options)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise RayscreenError(f"backbone weights {weights}: do not fit torchvision {name} "
                                 f"({str(e).splitlines()[0]}; {str(e)[:300]})") from None
    return model


class Backbone(nn.Module):
    """A torchvision network cut before its classifier: (B, 3, H, W) -> (B, feature_dim)."""

    def __init__(self, name: str, net: nn.Module, feature_dim: int, input_size: int, fixed_size: bool = False):
        super().__init__()
        self.name, self.net = name, net
        self.feature_dim, self.input_size, self.fixed_size = int(feature_dim), int(input_size), fixed_size
        self.in_channels = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) float, ImageNet-normalised -> features (B, feature_dim)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name}: input must be (B, 3, H, W) (replicate greyscale channels), "
                             f"got {tuple(x.shape)}")
        if self.fixed_size and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        out = self.net(x)
        if not isinstance(out, torch.Tensor):  # inception's namedtuple, should aux ever be on
            out = out[0]
        return out.flatten(1)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, feature_dim={self.feature_dim}, input_size={self.input_size}"


def create_backbone(name: str, weights: str | None = None, storage_options: dict[str, Any] | None = None,
                    seed: int = RANDOM_INIT_SEED) -> Backbone:
    """The feature extractor ``name`` (see the module docstring), weights from a path/URI or,
    without them, a random initialisation from ``seed``."""
    spec = _spec(name)
    net = _torchvision_model(name, weights, storage_options, seed)
    if name in ("resnet18", "resnet50"):
        net.fc = nn.Identity()
    elif name == "vgg16":
        net.classifier = net.classifier[:-1]  # up to fc7 -> ReLU -> Dropout (identity in eval)
    elif name == "inception_v3":
        net.fc = nn.Identity()
        net.AuxLogits = None
        net.aux_logits = False
    elif name == "convnext_tiny":
        net.classifier[-1] = nn.Identity()
    elif name == "vit_b_16":
        net.heads = nn.Identity()
    return Backbone(name, net, spec.feature_dim, spec.input_size, fixed_size=name == "vit_b_16").eval()


def save_backbone_weights(name: str, path: str, storage_options: dict[str, Any] | None = None,
                          seed: int = RANDOM_INIT_SEED) -> str:
    """Write a randomly initialised (seeded) torchvision state dict of ``name`` to ``path``
    (local or fsspec URI), in the format ``create_model(name, weights=path)`` reads."""
    import fsspec

    state = _torchvision_model(name, None, None, seed).state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    with fsspec.open(str(path), "wb", **(storage_options or {})) as f:
        f.write(buf.getvalue())
    return str(path)


# ---------------------------------------------------------------- conv trunks for milnet

def conv_trunk(name: str, in_channels: int = 3, weights: str | None = None,
               storage_options: dict[str, Any] | None = None, seed: int | None = None) -> tuple[nn.Module, int, int]:
    """The convolutional part of a torchvision net, keeping spatial maps:
    (B, in_channels, H, W) -> (B, D, H/32, W/32). Returns (module, D, minimum input side).

    For ``in_channels != 3`` a learned 1x1 convolution maps the channels to 3 first.
    Without ``weights`` the net is initialised from ``seed`` (None: :data:`RANDOM_INIT_SEED`)."""
    trunks = {"resnet18": 512, "resnet50": 2048, "vgg16": 512, "convnext_tiny": 768}
    if name not in trunks:
        raise KeyError(f"milnet trunk {name!r}: expected 'small' or one of {', '.join(sorted(trunks))}")
    net = _torchvision_model(name, weights, storage_options, RANDOM_INIT_SEED if seed is None else seed)
    if name.startswith("resnet"):
        body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                             net.layer4)
    else:  # vgg16 and convnext_tiny keep their convolutional part in .features
        body = net.features
    if in_channels != 3:
        body = nn.Sequential(nn.Conv2d(in_channels, 3, 1), *body) if isinstance(body, nn.Sequential) else \
            nn.Sequential(nn.Conv2d(in_channels, 3, 1), body)
    return body, trunks[name], 32
