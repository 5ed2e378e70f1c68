"""The node set: ComfyUI's class names and input names for what Z-Image workflows use."""

from __future__ import annotations

from zimage_serve.workflow.nodes.conditioning import (
    CLIPTextEncode,
    ConditioningCombine,
    ConditioningConcat,
    ConditioningSetTimestepRange,
    ConditioningZeroOut,
)
from zimage_serve.workflow.nodes.custom_sampling import (
    BasicGuider,
    BasicScheduler,
    CFGGuider,
    DisableNoise,
    KSamplerSelect,
    RandomNoise,
    SamplerCustomAdvanced,
)
from zimage_serve.workflow.nodes.image import (
    LoadImage,
    LoadImageMask,
    PreviewImage,
    SaveImage,
    VAEDecode,
    VAEEncode,
)
from zimage_serve.workflow.nodes.image_ops import (
    BatchImagesNode,
    Canny,
    EmptyImage,
    GetImageSize,
    ImageBatch,
    ImageBlur,
    ImageCompositeMasked,
    ImageCrop,
    ImageInvert,
    ImagePadForOutpaint,
    ImageScale,
    ImageScaleBy,
    ImageScaleToMaxDimension,
    ImageScaleToTotalPixels,
    ImageSharpen,
    ResolutionSelector,
)
from zimage_serve.workflow.nodes.latent import (
    EmptyLatentImage,
    EmptySD3LatentImage,
    InpaintModelConditioning,
    LatentUpscale,
    LatentUpscaleBy,
    RepeatLatentBatch,
    SetLatentNoiseMask,
    VAEEncodeForInpaint,
)
from zimage_serve.workflow.nodes.loaders import (
    CheckpointLoaderSimple,
    CLIPLoader,
    LoraLoader,
    LoraLoaderModelOnly,
    UNETLoader,
    VAELoader,
)
from zimage_serve.workflow.nodes.mask import (
    BatchMasksNode,
    GrowMask,
    ImageToMask,
    InvertMask,
    MaskToImage,
    SolidMask,
)
from zimage_serve.workflow.nodes.model_patch import ModelPatchLoader, QwenImageDiffsynthControlnet, ZImageFunControlnet
from zimage_serve.workflow.nodes.sampling import KSampler, KSamplerAdvanced, ModelSamplingAuraFlow
from zimage_serve.workflow.nodes.save_advanced import SaveImageAdvanced
from zimage_serve.workflow.nodes.upscale import ImageUpscaleWithModel, UpscaleModelLoader
from zimage_serve.workflow.spec import Node

NODES: dict[str, type[Node]] = {
    cls.__name__: cls
    for cls in (
        CheckpointLoaderSimple,
        UNETLoader,
        CLIPLoader,
        VAELoader,
        LoraLoader,
        LoraLoaderModelOnly,
        CLIPTextEncode,
        ConditioningZeroOut,
        ConditioningCombine,
        ConditioningConcat,
        ConditioningSetTimestepRange,
        EmptyLatentImage,
        EmptySD3LatentImage,
        LatentUpscale,
        LatentUpscaleBy,
        RepeatLatentBatch,
        SetLatentNoiseMask,
        VAEEncodeForInpaint,
        InpaintModelConditioning,
        ModelSamplingAuraFlow,
        KSampler,
        KSamplerAdvanced,
        SamplerCustomAdvanced,
        KSamplerSelect,
        BasicScheduler,
        RandomNoise,
        DisableNoise,
        BasicGuider,
        CFGGuider,
        VAEDecode,
        VAEEncode,
        LoadImage,
        SaveImage,
        SaveImageAdvanced,
        PreviewImage,
        EmptyImage,
        ImageInvert,
        ImageScale,
        ImageScaleBy,
        ImageScaleToMaxDimension,
        ImageScaleToTotalPixels,
        ImageCrop,
        ImageBlur,
        ImageSharpen,
        ImagePadForOutpaint,
        ImageCompositeMasked,
        GetImageSize,
        ResolutionSelector,
        ImageBatch,
        BatchImagesNode,
        LoadImageMask,
        SolidMask,
        InvertMask,
        GrowMask,
        BatchMasksNode,
        ImageToMask,
        MaskToImage,
        Canny,
        ModelPatchLoader,
        QwenImageDiffsynthControlnet,
        ZImageFunControlnet,
        UpscaleModelLoader,
        ImageUpscaleWithModel,
    )
}
