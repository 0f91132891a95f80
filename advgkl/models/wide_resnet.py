"""WideResNet-depth-width (Zagoruyko & Komodakis 2016) with pre-activation blocks, as used by TRADES,
the GKL paper (WRN-34-10) and the generated-data papers (WRN-28-10 / WRN-70-16 with Swish).

Parameter layout (`net.` keys): stem, groups.{0,1,2}.{i}.{bn1,conv1,bn2,conv2,shortcut}, bn, fc.
`convert_reference_state_dict` maps TRADES-style and DeepMind-style checkpoints onto it.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from advgkl.errors import UserError
from advgkl.models import CheckpointableBlock, make_activation, register_model


class WideBlock(CheckpointableBlock):
    """bn-act-conv3x3-bn-act-conv3x3 plus shortcut; [B, cin, H, W] -> [B, cout, H/stride, W/stride].

    tf_padding: pad stride-2 convs by (0, 1, 0, 1) like TF's SAME (DeepMind checkpoints need it);
    otherwise PyTorch's symmetric padding=1 (TRADES checkpoints).
    """

    def __init__(self, cin: int, cout: int, stride: int, activation: str, tf_padding: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.act1 = make_activation(activation)
        self.pad = tf_padding and stride == 2
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=0 if self.pad else 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = make_activation(activation)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if cin != cout else None

    def block(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        # with a projection, the shortcut also takes the pre-activated input (as in TRADES and DeepMind)
        skip = x if self.shortcut is None else self.shortcut(out)
        if self.pad:
            out = F.pad(out, (0, 1, 0, 1))
        out = self.conv1(out)
        out = self.conv2(self.act2(self.bn2(out)))
        return out + skip


class WideResNet(nn.Module):
    """WRN-depth-width: 3 groups of (depth - 4) / 6 blocks, widths 16w, 32w, 64w.

    Input [B, in_channels, H, W] (32x32 for CIFAR; any size works); output logits [B, num_classes].
    """

    def __init__(self, depth: int = 34, width: int = 10, num_classes: int = 10, in_channels: int = 3,
                 activation: str = "relu", tf_padding: bool = False):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise UserError(f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, 70, ...), got {depth}")
        if width < 1:
            raise UserError(f"WideResNet width must be >= 1, got {width}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        groups = []
        for g in range(3):
            cin, cout, stride = widths[g], widths[g + 1], 1 if g == 0 else 2
            groups.append(nn.Sequential(*[
                WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, activation, tf_padding)
                for i in range(n)]))
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(widths[3])
        self.act = make_activation(activation)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.groups(self.stem(x))
        out = self.act(self.bn(out))
        # global average pool = avg_pool2d(8) at 32x32, and still valid for other sizes
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def _wrn(depth, width, activation, tf_padding):
    def factory(num_classes: int = 10, in_channels: int = 3, depth: int = depth, width: int = width,
                activation: str = activation, tf_padding: bool = tf_padding) -> nn.Module:
        return WideResNet(depth, width, num_classes, in_channels, activation, tf_padding)
    factory.__doc__ = f"WRN-{depth}-{width}, {activation}; depth/width/activation/tf_padding can be overridden."
    return factory


# ReLU nets follow TRADES (PyTorch padding); Swish nets follow DeepMind (SAME padding), which is where
# their published checkpoints come from. Params for 10 classes in the comments.
register_model("wrn_28_10")(_wrn(28, 10, "relu", False))  # 36,479,194; 10.5 GFLOPs at 32x32
register_model("wrn_34_10")(_wrn(34, 10, "relu", False))  # 46,160,474; 13.3 GFLOPs at 32x32
register_model("wrn_70_16")(_wrn(70, 16, "relu", False))  # 266,796,506
register_model("wrn_28_10_swish")(_wrn(28, 10, "swish", True))
register_model("wrn_70_16_swish")(_wrn(70, 16, "swish", True))


_TRADES_KEYS = [  # (pattern, replacement) on keys of the TRADES / RobustBench `WideResNet`
    (r"^conv1\.", "net.stem."),
    (r"^block(\d)\.layer\.(\d+)\.convShortcut\.", lambda m: f"net.groups.{int(m[1]) - 1}.{m[2]}.shortcut."),
    (r"^block(\d)\.layer\.(\d+)\.", lambda m: f"net.groups.{int(m[1]) - 1}.{m[2]}."),
    (r"^bn1\.", "net.bn."),
    (r"^fc\.", "net.fc."),
]
_DM_KEYS = [  # the same for DeepMind's `DMWideResNet` (RobustBench `dm_wide_resnet.py`)
    (r"^(mean|std)$", r"normalize.\1"),
    (r"^init_conv\.", "net.stem."),
    (r"^layer\.(\d)\.block\.(\d+)\.batchnorm_0\.", r"net.groups.\1.\2.bn1."),
    (r"^layer\.(\d)\.block\.(\d+)\.batchnorm_1\.", r"net.groups.\1.\2.bn2."),
    (r"^layer\.(\d)\.block\.(\d+)\.conv_0\.", r"net.groups.\1.\2.conv1."),
    (r"^layer\.(\d)\.block\.(\d+)\.conv_1\.", r"net.groups.\1.\2.conv2."),
    (r"^layer\.(\d)\.block\.(\d+)\.shortcut\.", r"net.groups.\1.\2.shortcut."),
    (r"^batchnorm\.", "net.bn."),
    (r"^logits\.", "net.fc."),
]


def convert_reference_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a TRADES-style or DeepMind-style WideResNet state_dict to `create_model("wrn_...")` keys.

    A `module.` prefix (DataParallel) is dropped; DeepMind's mean/std [C, 1, 1] become the
    `normalize.*` buffers [1, C, 1, 1]. TRADES checkpoints carry no mean/std: keep the model's own.
    Unknown keys raise `UserError` naming them.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    rules = _DM_KEYS if any(k.startswith("init_conv.") for k in state) else _TRADES_KEYS
    out, unknown = {}, []
    for key, value in state.items():
        for pattern, repl in rules:
            new, hits = re.subn(pattern, repl, key)
            if hits:
                out[new] = value.reshape(1, -1, 1, 1) if new.startswith("normalize.") else value
                break
        else:
            unknown.append(key)
    if unknown:
        raise UserError(f"checkpoint keys not in a WideResNet: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    return out
