"""The models: the article's attention-VGG16 (vgg), other attention families, the zoo."""
