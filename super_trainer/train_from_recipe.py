"""``python -m super_trainer.train_from_recipe --config-name=NAME [key=value ...]``: the same as ``super-trainer``."""
from .cli import main

if __name__ == "__main__":
    main()
