"""The commands of ``paymaster``, one module per area; ``cli.main`` assembles them."""
