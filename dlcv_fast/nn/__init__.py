"""nn.Module wrappers of the dlcv_fast ops, with timm's parameter names."""
from dlcv_fast.nn.attention import Attention, CrossAttention, attention_row
from dlcv_fast.nn.block import Block, DropPath, run_blocks
from dlcv_fast.nn.mlp import Mlp, QuickGELU
from dlcv_fast.nn.norm import LayerNorm
from dlcv_fast.nn.patch_embed import PatchEmbed
from dlcv_fast.nn.rotary import RotaryEmbedding2D
from dlcv_fast.nn.window_attention import SwinTransformerBlock, WindowAttention, swin_window_and_shift
