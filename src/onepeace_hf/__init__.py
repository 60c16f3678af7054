"""ONE-PEACE for Hugging Face transformers.

Importing this package registers the ONE-PEACE classes with the Auto classes, so that `AutoConfig`, `AutoModel`,
`AutoProcessor`, `AutoTokenizer`, `AutoImageProcessor` and `AutoFeatureExtractor` load a saved folder without
`trust_remote_code`.
"""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoImageProcessor,
    AutoModel,
    AutoModelForAudioClassification,
    AutoModelForImageClassification,
    AutoModelForVisualQuestionAnswering,
    AutoProcessor,
    AutoTokenizer,
)

from .audio_utils import load_audio
from .configuration_onepeace import OnePeaceConfig
from .feature_extraction_onepeace import OnePeaceFeatureExtractor
from .image_processing_onepeace import OnePeaceImageProcessor
from .masking import OnePeaceMaskingCollator
from .modeling_onepeace import OnePeaceModel, OnePeaceModelOutput, OnePeacePreTrainedModel
from .modeling_onepeace_pretraining import OnePeaceForPretraining, OnePeaceForPretrainingOutput
from .modeling_onepeace_tasks import (
    OnePeaceForAudioClassification,
    OnePeaceForAudioLanguageClassification,
    OnePeaceForAudioLanguageMultipleChoice,
    OnePeaceForImageClassification,
    OnePeaceForVisionLanguageClassification,
    OnePeaceForVisualGrounding,
)
from .processing_onepeace import OnePeaceProcessor
from .tokenization_onepeace import OnePeaceTokenizer


AutoConfig.register(OnePeaceConfig.model_type, OnePeaceConfig, exist_ok=True)
AutoModel.register(OnePeaceConfig, OnePeaceModel, exist_ok=True)
AutoModelForImageClassification.register(OnePeaceConfig, OnePeaceForImageClassification, exist_ok=True)
AutoModelForAudioClassification.register(OnePeaceConfig, OnePeaceForAudioClassification, exist_ok=True)
# VQA as answer classification, like ViLT. Grounding (one box per text, no scores) does not fit the zero-shot
# detection API, and text+audio models have no Auto class: those load by their own class.
AutoModelForVisualQuestionAnswering.register(OnePeaceConfig, OnePeaceForVisionLanguageClassification, exist_ok=True)
AutoTokenizer.register(OnePeaceConfig, tokenizer_class=OnePeaceTokenizer, exist_ok=True)
AutoImageProcessor.register(OnePeaceConfig, image_processor_classes={"pil": OnePeaceImageProcessor}, exist_ok=True)
AutoFeatureExtractor.register(OnePeaceConfig, OnePeaceFeatureExtractor, exist_ok=True)
AutoProcessor.register(OnePeaceConfig, OnePeaceProcessor, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
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
    "load_audio",
]
