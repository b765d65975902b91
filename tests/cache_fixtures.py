"""Classic vision architectures written the way the most fine-tuned ones are (torchvision's style), small and
randomly initialised, for the FrozenPrefixCache tests:

- ``resnet18``: a ResNet-18-shaped CNN: the stem's ``self.relu = nn.ReLU(inplace=True)`` and ``self.maxpool``
  called in the root's ``forward`` between frozen modules, ``out += identity`` in every block,
  ``layer1..layer4`` of two ``BasicBlock`` each;
- ``vit``: a classic ViT: ``conv_proj`` patch embedding, a class token concatenated and a position embedding
  added, ``nn.Dropout(p=0)``, encoder blocks in a ``Sequential`` of named blocks built on
  ``nn.MultiheadAttention`` (and one ``nn.TransformerEncoderLayer``, whose CPU fast path differs);
- ``mobilenet``: a MobileNet-style net of inverted residuals with ``Hardswish(inplace=True)``;
- ``densenet``: a DenseNet-style net whose dense layers concatenate every earlier feature map.

Each is wrapped in ``VisionModule`` from ``hf_models`` (``(x, y)`` batches of 16x16 RGB images).
``FROZEN`` names the modules each test freezes: a leading part of the network, as a user fine-tuning would.
"""

from __future__ import annotations

from collections import OrderedDict

import lightning.pytorch as pl
import torch
from hf_models import IMAGE, NUM_CLASSES, ImageData, make_optimizer
from torch import nn
from torch.nn import functional as F  # noqa: N812 - torchvision's spelling
from torch.utils.data import DataLoader


# ---------------------------------------------------------------------------------------------- ResNet-18
def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet18(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (8, 16, 24, 32), num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(
                self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width))
            )
            cin = width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


# ---------------------------------------------------------------------------------------------- ViT
class MLPBlock(nn.Sequential):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0)
        )


class EncoderBlock(nn.Module):
    """Pre-norm transformer block on ``nn.MultiheadAttention``, as torchvision's ViT writes it."""

    def __init__(self, heads: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, hidden)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torchvision's name
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x)
        x = x + input
        y = self.ln_2(x)
        y = self.mlp(y)
        return x + y


class Encoder(nn.Module):
    def __init__(self, seq_length: int, layers: int, heads: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(0.0)
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(layers):
            if (
                i == 1
            ):  # torch's own encoder layer: another attention code path (its CPU fast path in eval mode)
                blocks[f"encoder_layer_{i}"] = nn.TransformerEncoderLayer(
                    dim, heads, hidden, dropout=0.0, batch_first=True, norm_first=True
                )
            else:
                blocks[f"encoder_layer_{i}"] = EncoderBlock(heads, dim, hidden)
        self.layers = nn.Sequential(blocks)
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        input = input + self.pos_embedding
        return self.ln(self.layers(self.dropout(input)))


class VisionTransformer(nn.Module):
    def __init__(
        self, patch: int = 4, layers: int = 3, heads: int = 2, dim: int = 32, hidden: int = 48
    ) -> None:
        super().__init__()
        self.patch, self.dim = patch, dim
        self.conv_proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        seq_length = (IMAGE // patch) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = Encoder(seq_length, layers, heads, dim, hidden)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(dim, NUM_CLASSES)))

    def _process_input(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self.conv_proj(x)
        x = x.reshape(n, self.dim, -1)
        return x.permute(0, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._process_input(x)
        batch_class_token = self.class_token.expand(x.shape[0], -1, -1)
        x = torch.cat([batch_class_token, x], dim=1)
        x = self.encoder(x)
        x = x[:, 0]
        return self.heads(x)


# ---------------------------------------------------------------------------------------------- MobileNet
class ConvBNActivation(nn.Sequential):
    def __init__(
        self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: bool = True
    ):
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act:
            layers.append(nn.Hardswish(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, expanded: int, cout: int, stride: int) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        self.block = nn.Sequential(
            ConvBNActivation(cin, expanded, kernel=1),
            ConvBNActivation(expanded, expanded, stride=stride, groups=expanded),
            ConvBNActivation(expanded, cout, kernel=1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


class MobileNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        settings = [(8, 16, 8, 1), (8, 24, 12, 2), (12, 36, 12, 1), (12, 48, 16, 2), (16, 64, 16, 1)]
        layers: list[nn.Module] = [ConvBNActivation(3, 8, stride=2)]
        layers += [InvertedResidual(*s) for s in settings]
        layers.append(ConvBNActivation(16, 48, kernel=1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(48, 32),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=0.2, inplace=True),
            nn.Linear(32, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ---------------------------------------------------------------------------------------------- DenseNet
class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, input: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:  # noqa: A002
        prev_features = [input] if isinstance(input, torch.Tensor) else input
        concated = torch.cat(prev_features, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(concated)))
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, layers: int, cin: int, growth: int) -> None:
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(cin + i * growth, growth))

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet(nn.Module):
    def __init__(self, growth: int = 6, blocks: tuple[int, ...] = (2, 2, 2), init: int = 12) -> None:
        super().__init__()
        features: OrderedDict[str, nn.Module] = OrderedDict(
            conv0=nn.Conv2d(3, init, 3, padding=1, bias=False),
            norm0=nn.BatchNorm2d(init),
            relu0=nn.ReLU(inplace=True),
            pool0=nn.MaxPool2d(3, stride=2, padding=1),
        )
        channels = init
        for i, n in enumerate(blocks):
            features[f"denseblock{i + 1}"] = DenseBlock(n, channels, growth)
            channels += n * growth
            if i != len(blocks) - 1:
                features[f"transition{i + 1}"] = Transition(channels, channels // 2)
                channels //= 2
        features["norm5"] = nn.BatchNorm2d(channels)
        self.features = nn.Sequential(features)
        self.classifier = nn.Linear(channels, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


# ---------------------------------------------------------------------------------------------- wrapping
BUILDERS = {"resnet18": ResNet18, "vit": VisionTransformer, "mobilenet": MobileNet, "densenet": DenseNet}

# The leading modules each test freezes (LayerFreeze names), and the blocks FreezeOut freezes one by one.
FROZEN = {
    "resnet18": ["model.conv1", "model.bn1", "model.layer1", "model.layer2", "model.layer3"],
    "vit": ["model.conv_proj", "model.encoder.layers.encoder_layer_0", "model.encoder.layers.encoder_layer_1"],
    "mobilenet": [f"model.features.{i}" for i in range(4)],
    "densenet": ["model.features.conv0", "model.features.norm0", "model.features.denseblock1",
                 "model.features.transition1"],
}  # fmt: skip
FREEZEOUT_LAYERS = {
    "resnet18": ["model.conv1", "model.bn1", "model.layer*", "model.fc"],
    # auto[0] and auto[2]: the root's own parameters (class token) and the encoder's (position embedding)
    "vit": ["auto[0]", "model.conv_proj", "auto[2]", "model.encoder.layers.*", "model.encoder.ln", "model.heads"],
    "mobilenet": ["model.features.*", "model.classifier.*"],
    "densenet": ["model.features.*", "model.classifier"],
}  # fmt: skip


class ClassicModule(pl.LightningModule):
    """A user's LightningModule around one of the classic architectures: ``(x, y)`` batches, the model in
    ``self.model``."""

    def __init__(self, kind: str, lr: float = 1e-2, **model_kw) -> None:
        super().__init__()
        self.model = BUILDERS[kind](**model_kw)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return make_optimizer("adamw", self.parameters(), self.lr)


def loader(n: int = 24, seed: int = 0, batch_size: int = 8, shuffle: bool = True) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ImageData(n, seed), batch_size=batch_size, shuffle=shuffle, generator=g)
