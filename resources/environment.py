import dagster as dg
from pydantic import Field

from dpo_driver.environment import Environment, load_environment


class EnvironmentResource(dg.ConfigurableResource):
    """The environment family every stage acts in: a built-in one (`miniwob`, `tooluse`, `sql`) or a
    user's class (`package.module:Class`, an `dpo_driver.environment.Environment`)."""

    family: str = Field("miniwob", description="built-in family name or 'package.module:Class'")
    options: dict[str, str] = Field({}, description="keyword arguments for the family's constructor, e.g. MiniWoB's "
                                    "chrome_binary / chromedriver (default: $MINIWOB_CHROME_BINARY, then PATH)")

    def get(self) -> Environment:
        """The family instance; raises naming what is wrong (unknown family, missing interface, bad options)."""
        return load_environment(self.family, **self.options)
