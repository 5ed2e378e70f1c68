"""zimage-nano: the small default model of Z-Image's architecture that this project builds and ships."""
