"""Image metrics (PSNR, SSIM, LPIPS/PSIM, rFID features and statistics, colour fidelity).

Pure measurements on images and tensors: no stage, report or training code. Evaluation combines
them (:mod:`vaeft.evaluate.suite`) and the LPIPS loss reuses the perceptual network.
"""
