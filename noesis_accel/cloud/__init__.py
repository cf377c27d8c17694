"""Modal: settings from the config, the image, the job in the container and the laptop's side of a
run or sweep. The highest wing of the package.
"""
