/*
 * TEST-ONLY stand-in for bcryptprimitives.dll, for running the Windows binary under
 * Debian's wine 8.0, which lacks that DLL. Rust's std (1.78 and later) imports ProcessPrng
 * from it for random numbers (HashMap seeds); without it the loader refuses the .exe.
 * Real Windows (8.1 and later) ships the DLL. This file is built by .ci/cross-test into a
 * throwaway wine prefix only; it is never part of a package. See packaging/README.md.
 *
 * ProcessPrng fills the buffer from RtlGenRandom (advapi32's SystemFunction036), the
 * system CSPRNG that wine implements.
 */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x10000000 ? 0x10000000 : (ULONG)len;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}

BOOL WINAPI DllMain(HINSTANCE instance, DWORD reason, LPVOID reserved)
{
    (void)instance;
    (void)reason;
    (void)reserved;
    return TRUE;
}
