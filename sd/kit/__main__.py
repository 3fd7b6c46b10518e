"""`python -m sd.kit`: build (or check) an offline model kit; see sd/kit/build.py."""

from sd.kit.build import main

if __name__ == "__main__":
    main()
