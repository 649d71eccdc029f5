"""The files a run reads and writes besides the cache: a recipe's inputs (images, masks,
OpenPose keypoints, text), resolved, hashed and decoded, and the images and GIFs it exports.

A floor of its own between the engine and the stages: the engine plans and runs, this room
knows file formats (it reads keypoints and writes figures with the stages' helpers).
"""
