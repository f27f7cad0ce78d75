import dagster as dg

from dpo_driver.env import find_browser


class WebEnvironment(dg.ConfigurableResource):
    """Real MiniWoB++ in headless Chromium (Selenium). Paths default to $MINIWOB_CHROME_BINARY etc."""

    chrome_binary: str = ""
    chromedriver: str = ""

    def browser(self) -> tuple[str, str]:
        """(chromium, chromedriver) paths; raises with install instructions when missing."""
        return find_browser(self.chrome_binary or None, self.chromedriver or None)
