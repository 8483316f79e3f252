"""multitoken: multi-token prediction for language models.

Train a decoder with extra heads that predict several future tokens (parallel heads of
Gloeckle et al., DeepSeek-V3's sequential MTP modules, or Medusa heads on a frozen model),
then decode it faster with self-speculative decoding whose output equals plain decoding.
"""

from multitoken.config import PRESETS, HeadsConfig, ModelConfig
from multitoken.errors import UserError

__version__ = "0.1.0"

__all__ = ["PRESETS", "HeadsConfig", "ModelConfig", "UserError", "__version__"]
