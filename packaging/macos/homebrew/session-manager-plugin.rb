# Homebrew formula for session-manager-plugin (Rust), for a tap such as
# ssm-rs/homebrew-tap (Formula/session-manager-plugin.rb). Builds from the release source
# tarball, so it serves Intel and Apple silicon Macs (and Linuxbrew) without notarization.
#
# At each release: update `url` to the new tag and `sha256` to
#   curl -sL <url> | shasum -a 256
# then `brew audit --strict --online session-manager-plugin` and
# `brew install --build-from-source session-manager-plugin && brew test session-manager-plugin`.
class SessionManagerPlugin < Formula
  desc "Drop-in replacement for the AWS Session Manager plugin, written in Rust"
  homepage "https://github.com/ssm-rs/session-manager-plugin"
  url "https://github.com/ssm-rs/session-manager-plugin/archive/refs/tags/v1.3.0.tar.gz"
  sha256 "0000000000000000000000000000000000000000000000000000000000000000" # replace at release
  license "Apache-2.0"
  head "https://github.com/ssm-rs/session-manager-plugin.git", branch: "main"

  depends_on "rust" => :build

  # The official plugin's cask installs the same command name.
  conflicts_with cask: "session-manager-plugin"

  def install
    system "cargo", "install", "--locked", *std_cargo_args
    prefix.install "packaging/THIRD-PARTY", "NOTICE"
  end

  def caveats
    <<~EOS
      Logging is off by default. Enable it per run with
        SSM_PLUGIN_LOG=debug aws ssm start-session ...
      Logs go to ~/Library/Logs/session-manager-plugin/ (macOS) or
      ~/.local/state/session-manager-plugin/ (Linux); SSM_PLUGIN_LOG_FILE picks another file.
    EOS
  end

  test do
    assert_equal "#{version}.0", shell_output("#{bin}/session-manager-plugin --version").strip
    assert_match "The Session Manager plugin was installed successfully",
                 shell_output("#{bin}/session-manager-plugin")
  end
end
