<#
.SYNOPSIS
  Builds session-manager-plugin-<version>-<arch>.msi from packaging/windows/session-manager-plugin.wxs.

.DESCRIPTION
  Run on Windows with the Rust toolchain (MSVC host), the .NET SDK and WiX v4 or v5:
      dotnet tool install --global wix --version 5.0.2
      pwsh packaging/windows/build-msi.ps1 -Arch x64
      pwsh packaging/windows/build-msi.ps1 -Arch arm64
  Output: target\packages\session-manager-plugin-<version>-<arch>.msi

  Optional Authenticode signing (binary and MSI) with signtool from the Windows SDK:
      $env:SIGN_CERT_THUMBPRINT = '<SHA-1 thumbprint of a code-signing certificate in the store>'
#>
[CmdletBinding()]
param(
    [ValidateSet('x64', 'arm64')]
    [string]$Arch = 'x64',
    [string]$TimestampUrl = 'http://timestamp.digicert.com'
)
$ErrorActionPreference = 'Stop'
Set-StrictMode -Version Latest

function Invoke-Checked {
    param([string]$Exe, [string[]]$Arguments)
    & $Exe @Arguments
    if ($LASTEXITCODE -ne 0) { throw "$Exe $($Arguments -join ' ') failed with exit code $LASTEXITCODE" }
}

$Root = (Resolve-Path (Join-Path $PSScriptRoot '..\..')).Path
Set-Location $Root

$Triple = @{ x64 = 'x86_64-pc-windows-msvc'; arm64 = 'aarch64-pc-windows-msvc' }[$Arch]
$Meta = (& cargo metadata --format-version 1 --no-deps) | ConvertFrom-Json
if ($LASTEXITCODE -ne 0) { throw 'cargo metadata failed' }
$Package = $Meta.packages | Where-Object { $_.name -eq 'session-manager-plugin' }
$Version = $Package.version                       # 1.3.0 (MSI ProductVersion: 3 fields)
$PluginVersion = (Get-Content packaging\VERSION -Raw).Trim()   # 1.3.0.0, what --version prints
$TargetDir = $Meta.target_directory
$Stage = Join-Path $TargetDir "msi-stage\$Arch"
$Out = Join-Path $TargetDir 'packages'

if (Get-Command python -ErrorAction SilentlyContinue) {
    Invoke-Checked python @('packaging\gen-third-party', '--check')
} else {
    Write-Warning 'python not found: not checking that packaging\THIRD-PARTY is current'
}

Invoke-Checked rustup @('target', 'add', $Triple)
# Static CRT: the binary then runs without the Visual C++ redistributable.
$env:RUSTFLAGS = '-C target-feature=+crt-static'
Invoke-Checked cargo @('build', '--release', '-p', 'session-manager-plugin', '--target', $Triple)
Remove-Item Env:\RUSTFLAGS

if (Test-Path $Stage) { Remove-Item -Recurse -Force $Stage }
New-Item -ItemType Directory -Force -Path $Stage, $Out | Out-Null
$Exe = Join-Path $TargetDir "$Triple\release\session-manager-plugin.exe"
Copy-Item $Exe (Join-Path $Stage 'session-manager-plugin.exe')
Copy-Item packaging\VERSION, packaging\THIRD-PARTY, packaging\session-manager-plugin.conf, LICENSE, NOTICE $Stage

if ($Arch -eq 'x64' -or $env:PROCESSOR_ARCHITECTURE -eq 'ARM64') {
    $Got = (& (Join-Path $Stage 'session-manager-plugin.exe') --version).Trim()
    if ($Got -ne $PluginVersion) { throw "binary prints '$Got', packaging\VERSION says '$PluginVersion'" }
}

$Sign = $env:SIGN_CERT_THUMBPRINT
if ($Sign) {
    Invoke-Checked signtool @('sign', '/sha1', $Sign, '/fd', 'sha256', '/tr', $TimestampUrl, '/td', 'sha256',
        (Join-Path $Stage 'session-manager-plugin.exe'))
}

$Msi = Join-Path $Out "session-manager-plugin-$Version-$Arch.msi"
Invoke-Checked wix @('build', '-arch', $Arch,
    '-d', "Version=$Version",
    '-d', "StageDir=$Stage",
    '-o', $Msi,
    'packaging\windows\session-manager-plugin.wxs')

if ($Sign) {
    Invoke-Checked signtool @('sign', '/sha1', $Sign, '/fd', 'sha256', '/tr', $TimestampUrl, '/td', 'sha256', $Msi)
}
Get-FileHash -Algorithm SHA256 $Msi | Format-List
Write-Host "build-msi: $Msi"
