"""Reading and caching data: image and mask files, synthetic images, preprocessing, the cache, augmentation."""
