"""Print the mode-token table of docs/modes.md: ``python -m sd3plugin.config.modes_table``."""
from .modes import markdown_table


def main() -> None:
    print(markdown_table())


if __name__ == "__main__":
    main()
