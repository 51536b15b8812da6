//! Closed sets of names (statuses, reasons) stored as text and shown as
//! JSON strings: one macro gives each the same API, so that none is
//! compared as a bare string.

/// Declares a `Copy` enum whose variants each have one text form, with:
/// `ALL`, `as_str`, `parse` (exact text, `None` otherwise), `FromStr` and
/// `TryFrom<String>` (a [`crate::DomainError::Unknown`] naming `field`),
/// `Display`, serde as that text, and an OpenAPI schema (a string
/// restricted to the text forms).
///
/// ```
/// events::named_enum! {
///     /// Where a parcel is.
///     pub enum Parcel: "parcel status" {
///         Packed => "PACKED",
///         Sent => "SENT",
///     }
/// }
/// assert_eq!(Parcel::parse("SENT"), Some(Parcel::Sent));
/// assert_eq!(serde_json::to_string(&Parcel::Packed).unwrap(), "\"PACKED\"");
/// assert!("sent".parse::<Parcel>().is_err());
/// ```
#[macro_export]
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident : $field:literal {
            $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The text form, as stored and shown.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            /// The value whose text form is exactly `s`.
            pub fn parse(s: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.as_str() == s)
            }

            /// The text forms, comma-separated (for error messages).
            pub fn names() -> String {
                Self::ALL
                    .iter()
                    .map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::DomainError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s).ok_or_else(|| $crate::DomainError::Unknown {
                    field: $field,
                    value: s.to_owned(),
                })
            }
        }

        impl TryFrom<String> for $name {
            type Error = $crate::DomainError;

            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::parse(&s).ok_or($crate::DomainError::Unknown { field: $field, value: s })
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl $crate::__serde::Serialize for $name {
            fn serialize<S: $crate::__serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> $crate::__serde::Deserialize<'de> for $name {
            fn deserialize<D: $crate::__serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <String as $crate::__serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(<D::Error as $crate::__serde::de::Error>::custom)
            }
        }

        impl $crate::__utoipa::PartialSchema for $name {
            fn schema() -> $crate::__utoipa::openapi::RefOr<$crate::__utoipa::openapi::schema::Schema> {
                $crate::__utoipa::openapi::ObjectBuilder::new()
                    .schema_type($crate::__utoipa::openapi::schema::Type::String)
                    .description(Some(concat!("A ", $field, ".")))
                    .enum_values(Some([$($text),+]))
                    .into()
            }
        }

        impl $crate::__utoipa::ToSchema for $name {}
    };
}
