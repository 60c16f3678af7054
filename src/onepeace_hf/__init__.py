"""ONE-PEACE for Hugging Face transformers.

Importing this package registers the ONE-PEACE classes with the Auto classes, so that `AutoConfig`, `AutoModel`,
`AutoProcessor`, `AutoTokenizer`, `AutoImageProcessor` and `AutoFeatureExtractor` load a saved folder without
`trust_remote_code`.
"""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForAudioClassification,
    AutoModelForImageClassification,
    AutoModelForVisualQuestionAnswering,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
    AutoTokenizer,
)
# From its module: transformers 5.17 exports a torchvision-requiring placeholder at the top level when torchvision is
# missing, although the PIL backend this package registers needs none.
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from .audio_utils import load_audio
from .configuration_onepeace import OnePeaceConfig, OnePeaceVisionConfig
from .default_model_path import DEFAULT_MODEL_PATH
from .feature_extraction_onepeace import OnePeaceFeatureExtractor
from .image_utils import load_image
from .image_processing_onepeace import OnePeaceImageProcessor
from .masking import OnePeaceMaskingCollator
from .modeling_onepeace import OnePeaceModel, OnePeaceModelOutput, OnePeacePreTrainedModel, OnePeaceVisionModel
from .modeling_onepeace_pretraining import OnePeaceForPretraining, OnePeaceForPretrainingOutput
from .modeling_onepeace_tasks import (
    OnePeaceForAudioClassification,
    OnePeaceForAudioLanguageClassification,
    OnePeaceForAudioLanguageMultipleChoice,
    OnePeaceForImageClassification,
    OnePeaceForVisionLanguageClassification,
    OnePeaceForVisualGrounding,
)
from .peft_utils import (
    load_lora_classifier,
    lora_classifier_kwargs,
    lora_config_for,
    lora_target_modules,
    save_classifier_labels,
    write_adapter_card,
)
from .processing_onepeace import OnePeaceProcessor
from .queries import Ranking, combine_embeddings, rank_candidates
from .tokenization_onepeace import OnePeaceTokenizer


AutoConfig.register(OnePeaceConfig.model_type, OnePeaceConfig, exist_ok=True)
AutoModel.register(OnePeaceConfig, OnePeaceModel, exist_ok=True)
AutoModelForImageClassification.register(OnePeaceConfig, OnePeaceForImageClassification, exist_ok=True)
AutoModelForAudioClassification.register(OnePeaceConfig, OnePeaceForAudioClassification, exist_ok=True)
# The CLIP-style dual encoder: the zero-shot-image-classification pipeline loads it through this Auto class
# (zero-shot-audio-classification, feature-extraction and image-feature-extraction use AutoModel).
AutoModelForZeroShotImageClassification.register(OnePeaceConfig, OnePeaceModel, exist_ok=True)
# VQA as answer classification, like ViLT. Grounding (one box per text, no scores) does not fit the zero-shot
# detection API, and text+audio models have no Auto class: those load by their own class.
AutoModelForVisualQuestionAnswering.register(OnePeaceConfig, OnePeaceForVisionLanguageClassification, exist_ok=True)
AutoTokenizer.register(OnePeaceConfig, tokenizer_class=OnePeaceTokenizer, exist_ok=True)
AutoImageProcessor.register(OnePeaceConfig, image_processor_classes={"pil": OnePeaceImageProcessor}, exist_ok=True)
AutoFeatureExtractor.register(OnePeaceConfig, OnePeaceFeatureExtractor, exist_ok=True)
AutoProcessor.register(OnePeaceConfig, OnePeaceProcessor, exist_ok=True)
# The vision branch (a backbone): its own config type, so that AutoModel builds the backbone, not the dual encoder.
AutoConfig.register(OnePeaceVisionConfig.model_type, OnePeaceVisionConfig, exist_ok=True)
AutoModel.register(OnePeaceVisionConfig, OnePeaceVisionModel, exist_ok=True)
AutoImageProcessor.register(
    OnePeaceVisionConfig, image_processor_classes={"pil": OnePeaceImageProcessor}, exist_ok=True
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL_PATH",
    "OnePeaceConfig",
    "OnePeaceFeatureExtractor",
    "OnePeaceForAudioClassification",
    "OnePeaceForAudioLanguageClassification",
    "OnePeaceForAudioLanguageMultipleChoice",
    "OnePeaceForImageClassification",
    "OnePeaceForPretraining",
    "OnePeaceForPretrainingOutput",
    "OnePeaceForVisionLanguageClassification",
    "OnePeaceForVisualGrounding",
    "OnePeaceImageProcessor",
    "OnePeaceMaskingCollator",
    "OnePeaceModel",
    "OnePeaceModelOutput",
    "OnePeacePreTrainedModel",
    "OnePeaceProcessor",
    "OnePeaceTokenizer",
    "OnePeaceVisionConfig",
    "OnePeaceVisionModel",
    "Ranking",
    "combine_embeddings",
    "load_audio",
    "load_image",
    "load_lora_classifier",
    "lora_classifier_kwargs",
    "lora_config_for",
    "lora_target_modules",
    "rank_candidates",
    "save_classifier_labels",
    "write_adapter_card",
]
