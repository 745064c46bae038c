"""Teacher-output caches: the teacher runs once over the training split, and training
reads its outputs from disk instead of running it.

    dense         a classifier's logits (N, C), one .npy file: `write_cache`, `open_cache`
    topk          a language model's top k next tokens per position, in shards:
                  `TopKCacheWriter`, `write_topk_cache`, `open_topk_cache`, `TopKCache`
    topk_teacher  a causal LM's top k from its logits (`teacher_topk`), and a run's cache
                  job (`write_teacher_cache`)
    manifest      what a top-k cache holds (`TopKCacheSpec`), its manifest.json and checks
    codec         the bytes of a top-k shard (exact and compact encodings) and their sizes
"""

from kdistill.cache.codec import topk_bytes_per_token
from kdistill.cache.dense import open_cache, write_cache
from kdistill.cache.manifest import TopKCacheSpec
from kdistill.cache.topk import TopKCache, TopKCacheWriter, open_topk_cache, write_topk_cache
from kdistill.cache.topk_teacher import teacher_topk, write_teacher_cache

__all__ = [
    "TopKCache",
    "TopKCacheSpec",
    "TopKCacheWriter",
    "open_cache",
    "open_topk_cache",
    "teacher_topk",
    "topk_bytes_per_token",
    "write_cache",
    "write_teacher_cache",
    "write_topk_cache",
]
